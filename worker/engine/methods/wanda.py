"""Wanda (Sun et al. 2023, arXiv 2306.11695): score |W_ij| * ||X_j||_2, lowest pruned per output row."""

from __future__ import annotations

import torch

from worker.engine.baselines import ScoreMethod, prune_lowest
from worker.engine.contract.method_table import method_info
from worker.engine.contract.patterns import SparsityPattern


def wanda_score(W: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||; ``input_sq_norms`` (cols,) is ||X_j||^2 up to a common scale, e.g. diag(H)
    (a common scale of the scores leaves the per-row ranking unchanged)."""
    return W.abs() * input_sq_norms.float().clamp(min=0).sqrt().reshape(1, -1)


@torch.no_grad()
def wanda_prune(W: torch.Tensor, input_sq_norms: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Wanda: the lowest |W_ij| * ||X_j|| of each output row (or N:M group) set to zero."""
    return prune_lowest(W, wanda_score(W.float(), input_sq_norms), pattern, per_row=True)


METHOD = ScoreMethod(method_info("wanda"), wanda_score, per_row=True)
