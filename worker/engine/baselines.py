"""Pruning by a score (magnitude, Wanda, RIA): the weights with the lowest scores are set to zero.

A ``ScoreMethod`` is such a method for the registry (worker.engine.methods): its score function
and whether scores compete within each output row or across the whole layer. Unstructured: the
``int(cols * s)`` lowest of each row, or the ``int(rows * cols * s)`` lowest of the layer; N:M:
the N lowest of every M consecutive inputs of a row (a ragged tail of fewer than M stays dense).
The kept weights are not updated; the result is a new fp32 matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from worker.engine.contract.method_table import MethodInfo
from worker.engine.contract.patterns import SparsityPattern
from worker.engine.sparsegpt import relative_error

# (W (rows, cols) fp32, diag(H) (cols,) or None) -> score (rows, cols); diag(H) = (2/n) ||X_j||^2
Score = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def mask_lowest(score: torch.Tensor, pattern: SparsityPattern, *, per_row: bool) -> torch.Tensor:
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
def prune_lowest(W: torch.Tensor, score: torch.Tensor, pattern: SparsityPattern, *, per_row: bool) -> torch.Tensor:
    """A fp32 copy of ``W`` with its lowest-scored weights set to zero (see ``mask_lowest``)."""
    W = W.to(torch.float32, copy=True)
    W[mask_lowest(score, pattern, per_row=per_row)] = 0
    return W


@dataclass(frozen=True)
class ScoreMethod:
    """A registry method that prunes each layer by its own score (the layers of a group alone)."""

    info: MethodInfo
    score: Score
    per_row: bool  # unstructured: scores compete within an output row (else across the layer)

    @torch.no_grad()
    def prune(self, dense: Sequence[torch.Tensor], H: torch.Tensor | None, solver, prune_shared=None):
        """(pruned fp32 weights, (error, loss, percdamp, refit) per layer); the error needs ``H``."""
        if H is None and self.info.needs_calibration:
            raise ValueError(f"method {self.info.name} needs the calibration inputs' statistics")
        diag = torch.diag(H) if H is not None else None
        pruned = [prune_lowest(W, self.score(W.float(), diag), solver.pattern, per_row=self.per_row) for W in dense]
        fits = [(relative_error(W, P, H) if H is not None else None, None, 0.0, None) for W, P in zip(dense, pruned)]
        return pruned, fits
