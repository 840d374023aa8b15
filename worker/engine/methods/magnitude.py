"""Magnitude pruning: the smallest |W_ij| of the whole layer (or of each N:M group); no calibration data."""

from __future__ import annotations

import torch

from worker.engine.baselines import ScoreMethod, prune_lowest
from worker.engine.contract.method_table import method_info
from worker.engine.contract.patterns import SparsityPattern


def magnitude_score(W: torch.Tensor, _diag: torch.Tensor | None = None) -> torch.Tensor:
    return W.abs()


@torch.no_grad()
def magnitude_prune(W: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Drop the smallest |w| of the whole layer (unstructured) or of each N:M group."""
    return prune_lowest(W, magnitude_score(W.float()), pattern, per_row=False)


METHOD = ScoreMethod(method_info("magnitude"), magnitude_score, per_row=False)
