"""The SparseGPT solver for one Linear layer (Frantar & Alistarh 2023, Algorithm 1).

Names follow the paper and the reference implementation: ``H`` the Hessian of the layer's
inputs, ``Hinv`` the upper Cholesky factor of its inverse, column blocks ``i1:i2`` of width
``blocksize``, ``W1``/``Q1``/``Err1``/``Losses1`` the block's running weights, pruned (and
quantized) weights, scaled errors and losses, ``d = Hinv1[i, i]``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.engine.patterns import SparsityPattern

log = logging.getLogger(__name__)


class Hessian:
    """H = (2/n) sum_x x x^T over the calibration tokens, n counting sequences (the reference's rule).

    The sum is kept in fp32 and scaled once at the end, which is the reference's running
    average ``H *= n/(n+b); H += 2/(n+b) X X^T`` without rescaling on every batch.
    """

    def __init__(self, columns: int, device: torch.device | str):
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)  # (cols, cols)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """``x``: the layer's input for ``b`` sequences, shape (b, seq, cols) or (b, cols)."""
        batch = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, cols)
        self.sum.addmm_(x.t(), x)
        self.nsamples += batch

    @property
    def H(self) -> torch.Tensor:
        if self.nsamples == 0:
            raise ValueError("the Hessian has seen no calibration data")
        return self.sum * (2.0 / self.nsamples)


@dataclass
class Quantizer:
    """Per output channel, asymmetric min-max grid found once from the dense weight (GPTQ's rule).

    The zero point is an integer, so a pruned 0 stays exactly 0 after quantization.
    """

    scale: torch.Tensor  # (rows, 1)
    zero: torch.Tensor  # (rows, 1)
    maxq: int

    @classmethod
    def fit(cls, W: torch.Tensor, bits: int) -> "Quantizer":
        if not 2 <= bits <= 8:
            raise ValueError(f"wbits must be between 2 and 8, got {bits}")
        maxq = 2**bits - 1
        xmin = W.min(dim=1).values.clamp(max=0)
        xmax = W.max(dim=1).values.clamp(min=0)
        both_zero = (xmin == 0) & (xmax == 0)
        xmin[both_zero], xmax[both_zero] = -1.0, 1.0
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / scale)
        return cls(scale=scale.unsqueeze(1), zero=zero.unsqueeze(1), maxq=maxq)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """``w``: one column (rows,) -> its value on the grid."""
        scale, zero = self.scale[:, 0], self.zero[:, 0]
        q = torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)
        return scale * (q - zero)


@dataclass
class PruneResult:
    weight: torch.Tensor  # (rows, cols) fp32, pruned (and quantized)
    loss: float  # the reference's sum of (w - q)^2 / d^2 / 2
    error: float  # relative reconstruction error ||(W - W') X||^2 / ||W X||^2 over the calibration data
    percdamp: float  # the dampening that was finally used


def inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, float]:
    """Upper Cholesky factor of (H + damp I)^-1, the percdamp used and damp; H is dampened in place.

    A matrix that is not positive definite even after dampening is retried with ten times
    more dampening (up to 1.0), and the retry is logged: it means too few calibration
    samples for this layer's width, or degenerate inputs.
    """
    mean_diag = torch.mean(torch.diag(H)).item()
    idx = torch.arange(H.shape[0], device=H.device)
    applied = 0.0
    while True:
        damp = percdamp * mean_diag
        H[idx, idx] += damp - applied
        applied = damp
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0:
                return U, percdamp, damp
        if percdamp >= 1.0:
            raise torch.linalg.LinAlgError(
                "the Hessian is not positive definite even with percdamp 1.0: "
                "use more calibration samples or check the inputs for NaN/inf"
            )
        new = min(percdamp * 10, 1.0)
        log.warning("Cholesky failed with percdamp %g; retrying with %g (more calibration samples help)",
                    percdamp, new)
        percdamp = new


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    pattern: SparsityPattern,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    wbits: int | None = None,
) -> PruneResult:
    """Prune ``W`` (rows, cols) to ``pattern`` minimizing ||W X - W' X||^2 given H ~ X X^T.

    Neither ``W`` nor ``H`` is modified. Both should be on the same device; the computation
    is fp32 whatever their dtype.
    """
    return sparsegpt_prune_shared([W], H, pattern, blocksize=blocksize, percdamp=percdamp, wbits=wbits)[0]


@torch.no_grad()
def sparsegpt_prune_shared(
    weights: Sequence[torch.Tensor],
    H: torch.Tensor,
    pattern: SparsityPattern,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    wbits: int | None = None,
) -> list[PruneResult]:
    """Prune several layers that read the same input (q/k/v; gate/up) in one pass.

    The OBS update never mixes rows, and the masks are chosen per row (N:M) or per layer
    within each column block (unstructured, with each layer's own threshold), so solving the
    stacked rows gives each layer exactly what solving it alone would, with one inverse
    Hessian and one column loop instead of one per layer.
    """
    if pattern.structured and blocksize % pattern.m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={pattern.m} for {pattern}")
    W = torch.cat([w.to(torch.float32) for w in weights])  # (rows, cols), a new tensor
    H = H.to(torch.float32, copy=True)
    rows, columns = W.shape
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + w.shape[0])
    segments = list(zip(bounds[:-1], bounds[1:]))

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    quantizer = Quantizer.fit(W, wbits) if wbits else None

    Hinv, used_percdamp, damp = inverse_hessian_factor(H, percdamp)
    Losses = torch.zeros(rows, device=W.device)
    n, m = pattern.n, pattern.m

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag1 = torch.diag(Hinv1)

        if pattern.structured:
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            score = W1**2 / diag1.reshape(1, -1) ** 2
            M1 = torch.empty_like(W1, dtype=torch.bool)
            for r0, r1 in segments:  # each layer keeps its own threshold
                seg = score[r0:r1]
                thresh = torch.sort(seg.flatten())[0][int(seg.numel() * pattern.sparsity)]
                M1[r0:r1] = seg <= thresh

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if pattern.structured and i % m == 0 and i + m <= count:  # a ragged tail stays dense
                score = W1[:, i : i + m] ** 2 / diag1[i : i + m].reshape(1, -1) ** 2
                M1.scatter_(1, i + torch.topk(score, n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[M1[:, i]] = 0
            if quantizer is not None:
                q = quantizer.quantize(q)
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    return [
        PruneResult(
            weight=W[r0:r1],
            loss=Losses[r0:r1].sum().item(),
            error=relative_error(w, W[r0:r1], H, damp=damp, dead=dead),
            percdamp=used_percdamp,
        )
        for w, (r0, r1) in zip(weights, segments)
    ]


def relative_error(
    W_dense: torch.Tensor,
    W_pruned: torch.Tensor,
    H: torch.Tensor,
    *,
    damp: float = 0.0,
    dead: torch.Tensor | None = None,
) -> float:
    """||(W - W') X||^2 / ||W X||^2 from H = (2/n) X X^T (the scale cancels).

    ``H`` may carry ``damp`` on its diagonal and 1s on the ``dead`` inputs' diagonal (the
    solver's in-place changes); both are taken out so the error is the one on the data.
    """
    W_dense, W_pruned = W_dense.float(), W_pruned.float()
    if dead is not None and bool(dead.any()):
        W_dense = W_dense.clone()
        W_dense[:, dead] = 0  # dead inputs are always zero: they add nothing to the outputs
        W_pruned = W_pruned.clone()
        W_pruned[:, dead] = 0
    delta = W_dense - W_pruned

    def quad(A: torch.Tensor) -> float:  # tr(A H A^T) without the dampening
        return (A.matmul(H) * A).sum().item() - damp * (A * A).sum().item()

    denom = quad(W_dense)
    if not math.isfinite(denom) or denom <= 0:
        return 0.0
    return max(quad(delta), 0.0) / denom
