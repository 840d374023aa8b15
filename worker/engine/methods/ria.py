"""RIA (Zhang et al. 2024, "Plug-and-Play", ICLR 2024): relative importance and activations.

    S_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ^ a,   a = 0.5

the weight's share of its output row i plus its share of its input column j, times the L2 norm
of input feature j over the calibration tokens to the power a. Which weights go, as the authors'
code (lib/prune.py, ``prune_ria``) does by default: unstructured, the lowest scores of the whole
layer (their ``--per_outneuron``, off by default, is Wanda's per-row comparison); N:M, the N
lowest of every M consecutive inputs of each row. Where that code prunes every score <= the
sorted score at ``int(rows * cols * s)`` (one weight more, ties too), here exactly that many go.

The norms come from the Hessian the driver collects, H = (2/n) X X^T (worker.engine.sparsegpt,
n counting sequences; routed tokens for an MoE expert): diag(H)_j = (2/n) ||X_j||^2, so
sqrt(diag(H)_j)^a = (2/n)^(a/2) ||X_j||^a. That factor is common to every score of the layer
and the mask is the one of the exact norms. (The authors' ``scaler_row`` is ||X_j||^2 / n:
the same up to that kind of factor.)
"""

from __future__ import annotations

import torch

from worker.engine.baselines import ScoreMethod, prune_lowest
from worker.engine.contract.method_table import method_info
from worker.engine.contract.patterns import SparsityPattern

A = 0.5  # the exponent of the activation norms (the paper's a)
PER_ROW = False  # unstructured: the lowest scores of the whole layer (the authors' default)


def ria_score(W: torch.Tensor, input_sq_norms: torch.Tensor, a: float = A) -> torch.Tensor:
    """S (rows, cols) from W and ``input_sq_norms`` (cols,) = ||X_j||^2 up to a common scale."""
    absW = W.float().abs()
    tiny = torch.finfo(torch.float32).tiny  # an all-zero row or column scores 0, not 0/0
    relative = absW / absW.sum(1, keepdim=True).clamp(min=tiny) + absW / absW.sum(0, keepdim=True).clamp(min=tiny)
    return relative * input_sq_norms.float().clamp(min=0).pow(a / 2).reshape(1, -1)


@torch.no_grad()
def ria_prune(W: torch.Tensor, input_sq_norms: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """RIA: the lowest scores of the layer (unstructured) or of each row's N:M groups set to zero."""
    return prune_lowest(W, ria_score(W, input_sq_norms), pattern, per_row=PER_ROW)


METHOD = ScoreMethod(method_info("ria"), ria_score, per_row=PER_ROW)
