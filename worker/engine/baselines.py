"""Baselines with the solver's interface: magnitude (per layer) and Wanda (|W| * ||X_j||).

Both return a new fp32 weight; neither updates the weights that are kept.
"""

from __future__ import annotations

import torch

from worker.engine.patterns import SparsityPattern


def _mask_lowest(score: torch.Tensor, pattern: SparsityPattern, *, per_row: bool) -> torch.Tensor:
    """True where a weight is pruned: the lowest scores, per N:M group, per row or per layer."""
    rows, cols = score.shape
    if pattern.structured:
        n, m = pattern.n, pattern.m
        full = cols - cols % m  # a ragged tail of fewer than m columns stays dense
        groups = score[:, :full].reshape(rows, full // m, m)
        idx = torch.topk(groups, n, dim=2, largest=False).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, full)
        return torch.cat([mask, torch.zeros(rows, cols - full, dtype=torch.bool, device=score.device)], 1)
    if per_row:
        k = int(cols * pattern.sparsity)
        idx = torch.topk(score, k, dim=1, largest=False).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
    k = int(score.numel() * pattern.sparsity)
    idx = torch.topk(score.flatten(), k, largest=False).indices
    return torch.zeros(score.numel(), dtype=torch.bool, device=score.device).scatter_(0, idx, True).reshape(rows, cols)


@torch.no_grad()
def magnitude_prune(W: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Drop the smallest |w| of the whole layer (unstructured) or of each N:M group."""
    W = W.to(torch.float32, copy=True)
    W[_mask_lowest(W.abs(), pattern, per_row=False)] = 0
    return W


@torch.no_grad()
def wanda_prune(W: torch.Tensor, input_sq_norms: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||, lowest pruned per output row (or N:M group).

    ``input_sq_norms`` (cols,) is ||X_j||^2 up to a common scale, e.g. diag(H).
    """
    W = W.to(torch.float32, copy=True)
    score = W.abs() * input_sq_norms.float().clamp(min=0).sqrt().reshape(1, -1)
    W[_mask_lowest(score, pattern, per_row=True)] = 0
    return W
