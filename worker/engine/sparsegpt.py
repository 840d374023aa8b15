"""The SparseGPT solver for one Linear layer (Frantar & Alistarh 2023, Algorithm 1).

Names follow the paper and the reference implementation: ``H`` the Hessian of the layer's
inputs, ``Hinv`` the upper Cholesky factor of its inverse, column blocks ``i1:i2`` of width
``blocksize``, ``W1``/``Q1``/``Err1`` the block's running weights, pruned (and quantized)
weights and scaled errors, ``d = Hinv1[i, i]``.

In the order they run: ``Hessian`` (accumulate H), ``LayerStack`` (the layers reading one H,
dead inputs zeroed, the optional ``Quantizer``), ``inverse_hessian_factor`` (dampen, factor),
``solve`` (block by block: mask, OBS updates, lazy update of the later columns; each block's
columns are a ``worker.engine.block_steps`` step). The same steps
with the reference's own arithmetic (the bit-for-bit mode) are ``worker.engine.reference``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from worker.engine.block_steps import BlockStep, fast_block_step
from worker.engine.contract.patterns import SparsityPattern
from worker.engine.quant import Quantization, QuantizedWeight, Quantizer, SolveGrids

log = logging.getLogger(__name__)

# (H, percdamp) -> (upper Cholesky factor of (H + damp I)^-1, percdamp used, damp); dampens H in place
Factorization = Callable[[torch.Tensor, float], tuple[torch.Tensor, float, float]]


class Hessian:
    """H = (2/n) sum_x x x^T over the calibration tokens, n counting sequences (the reference's rule).

    The fp32 sum is scaled once at the end: the reference's running average (``RunningHessian``)
    without rescaling on every batch. Only the tiles on and above the diagonal are multiplied
    (H is symmetric): with p tiles a side, (p + 1) / 2p of the flops of X^T X (0.56 at p = 8).
    """

    TILE = 192  # columns per tile; narrower inputs are multiplied whole
    MAX_PARTS = 8  # measured on CPU (2 threads, 2048 tokens a call): 576 wide 0.65x, 1536 wide 0.51x the time of X^T X

    def __init__(self, columns: int, device: torch.device | str):
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)  # (cols, cols)
        self.nsamples = 0
        parts = min(self.MAX_PARTS, max(1, math.ceil(columns / self.TILE)))
        edges = [round(columns * k / parts) for k in range(parts + 1)]
        self._tiles = list(zip(edges[:-1], edges[1:]))

    def add_batch(self, x: torch.Tensor) -> None:
        """``x``: the layer's input for ``b`` sequences, shape (b, seq, cols) or (b, cols)."""
        batch = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, cols)
        if len(self._tiles) == 1:
            self.sum.addmm_(x.t(), x)
        else:
            for a, (i0, i1) in enumerate(self._tiles):
                xi = x[:, i0:i1].t()
                for j0, j1 in self._tiles[a:]:
                    self.sum[i0:i1, j0:j1].addmm_(xi, x[:, j0:j1])
        self.nsamples += batch

    @property
    def H(self) -> torch.Tensor:
        if self.nsamples == 0:
            raise ValueError("the Hessian has seen no calibration data")
        S = self.sum
        if len(self._tiles) > 1:  # mirror the upper tiles into the lower ones
            S = torch.triu(S) + torch.triu(S, 1).t()
        return S * (2.0 / self.nsamples)


@dataclass
class PruneResult:  # one layer's solve
    weight: torch.Tensor  # (rows, cols) fp32, pruned (and quantized)
    loss: float  # the reference's sum of (w - q)^2 / d^2 / 2
    error: float  # relative reconstruction error ||(W - W') X||^2 / ||W X||^2 over the calibration data
    percdamp: float  # the dampening that was finally used
    quantized: QuantizedWeight | None = None  # with ``quantization``: the codes and scales behind ``weight``


@dataclass
class LayerStack:
    """The rows of the layers that read one H, stacked: the solve's W and H (fp32 copies). Dead
    inputs (diag(H) == 0) get H_jj = 1 and W[:, j] = 0; the grids are fitted to that W. With act
    order W's columns and H are permuted by ``perm`` (descending diag(H)); the solve undoes it."""

    W: torch.Tensor  # (rows, cols), every layer's rows one after the other
    H: torch.Tensor  # (cols, cols)
    segments: list[tuple[int, int]]  # rows r0:r1 of each layer in W
    quantizer: Quantizer | SolveGrids | None  # the ``wbits`` grid or the ``quantization`` grids
    perm: torch.Tensor | None = None  # act order: the original column solved at each position

    @classmethod
    def of(
        cls,
        weights: Sequence[torch.Tensor],
        H: torch.Tensor,
        wbits: int | None,
        quantization: Quantization | None = None,
    ) -> LayerStack:
        if wbits and quantization is not None:
            raise ValueError("give either wbits (the reference's grid) or quantization, not both")
        W = torch.cat([w.to(torch.float32) for w in weights])  # a new tensor
        H = H.to(torch.float32, copy=True)
        bounds = [0, *itertools.accumulate(w.shape[0] for w in weights)]
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        quantizer, perm = Quantizer.fit(W, wbits) if wbits else None, None
        if quantization is not None:
            if quantization.actorder:
                perm = torch.argsort(torch.diag(H), descending=True)
            quantizer = SolveGrids(quantization, W, perm)  # static grids see W in original order
            if perm is not None:
                W, H = W[:, perm], H[perm][:, perm]
        return cls(W=W, H=H, segments=list(zip(bounds[:-1], bounds[1:])), quantizer=quantizer, perm=perm)


def _upper_cholesky_of_inverse(H: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U) from ONE Cholesky factorization.

    With J the order-reversing permutation and J H J = L L^T, U = J L^-1 J: it is upper
    triangular with a positive diagonal and U^T U = J L^-T L^-1 J = (J (J H J) J)^-1 = H^-1,
    so it is that unique factor. This is the reference's cholesky -> cholesky_inverse ->
    cholesky (about 3.7 n^3 flops) in about 1.3 n^3, equal up to float rounding.
    """
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if info.item() != 0:
        return L, False
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1), True


def inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, float]:
    """Upper Cholesky factor of (H + damp I)^-1, the percdamp used and damp = percdamp * mean(diag(H));
    H is dampened in place, with more dampening if needed (``dampened_factor``)."""
    return dampened_factor(H, percdamp, torch.mean(torch.diag(H)).item(), _upper_cholesky_of_inverse)


def dampened_factor(
    H: torch.Tensor,
    percdamp: float,
    mean_diag: float | torch.Tensor,
    factor: Callable[[torch.Tensor], tuple[torch.Tensor, bool]],
) -> tuple[torch.Tensor, float, float]:
    """Add ``percdamp * mean_diag`` to H's diagonal (in place) and ``factor`` it: (U, percdamp, damp).

    ``factor(H)`` returns the upper Cholesky factor of H^-1 and whether it succeeded. If H is
    not positive definite even so, ten times more dampening (up to 1.0) is tried, and logged:
    too few calibration samples for this layer's width, or degenerate inputs.
    """
    idx = torch.arange(H.shape[0], device=H.device)
    applied = 0.0
    while True:
        damp = percdamp * mean_diag
        H[idx, idx] += damp - applied
        applied = damp
        U, ok = factor(H)
        if ok:
            return U, percdamp, float(damp)
        if percdamp >= 1.0:
            raise torch.linalg.LinAlgError(
                "the Hessian is not positive definite even with percdamp 1.0: "
                "use more calibration samples or check the inputs for NaN/inf"
            )
        new = min(percdamp * 10, 1.0)
        log.warning("Cholesky failed with percdamp %g; retrying with %g (more calibration samples help)", percdamp, new)
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
    quantization: Quantization | None = None,
) -> PruneResult:
    """Prune ``W`` (rows, cols) to ``pattern`` minimizing ||W X - W' X||^2 given H ~ X X^T.

    Neither ``W`` nor ``H`` is modified. Both should be on the same device; the computation
    is fp32 whatever their dtype.
    """
    return sparsegpt_prune_shared(
        [W], H, pattern, blocksize=blocksize, percdamp=percdamp, wbits=wbits, quantization=quantization
    )[0]


@torch.no_grad()
def sparsegpt_prune_shared(
    weights: Sequence[torch.Tensor],
    H: torch.Tensor,
    pattern: SparsityPattern,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    wbits: int | None = None,
    quantization: Quantization | None = None,
    column_loop: bool | None = None,
) -> list[PruneResult]:
    """Prune several layers that read the same input (q/k/v; gate/up) in one pass.

    The OBS update never mixes rows, and the masks are chosen per row (N:M) or per layer in
    each block (unstructured: each layer's own threshold), so solving the stacked rows gives
    each layer what solving it alone would, with one inverse Hessian and one loop for all.

    ``column_loop`` runs the blocks one column at a time (always so with quantization), else
    a group of columns at a time (``worker.engine.block_steps``: the same masks and weights up to float
    rounding); None picks the faster for the pattern and device.

    ``quantization`` quantizes jointly (the paper's section 5, GPTQ's groups): per column the
    mask first, then the kept weights on the column's group grid (``worker.engine.quant``), the
    error against the running unquantized weights propagated. Each result then carries its codes
    and scales (``PruneResult.quantized``). A pattern of sparsity 0 prunes nothing (GPTQ).
    """
    if quantization is not None and quantization.actorder and pattern.structured:
        raise ValueError(
            f"act order permutes the input columns, which breaks the {pattern} groups: "
            "use it with unstructured sparsity or none"
        )
    stack = LayerStack.of(weights, H, wbits, quantization)
    step = fast_block_step(pattern, stack.quantizer, stack.W.device, column_loop)
    return solve(
        stack, pattern, blocksize=blocksize, percdamp=percdamp, factorize=inverse_hessian_factor, block_step=step
    )


@torch.no_grad()
def solve(
    stack: LayerStack,
    pattern: SparsityPattern,
    *,
    blocksize: int,
    percdamp: float,
    factorize: Factorization,
    block_step: BlockStep,
) -> list[PruneResult]:
    """Algorithm 1 on ``stack`` (its W ends pruned, its H dampened); one result per layer.

    ``factorize`` and ``block_step`` are the arithmetic: the fast solver's, or the reference's.
    """
    if pattern.structured and blocksize % pattern.m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={pattern.m} for {pattern}")
    W, H = stack.W, stack.H
    rows, columns = W.shape
    W_dense = W.clone()
    dense_quad = (W.matmul(H) * W).sum(1)  # per row: w H w^T, before dampening

    Hinv, used_percdamp, damp = factorize(H, percdamp)
    Losses = torch.zeros(rows, device=W.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        if pattern.structured or pattern.sparsity == 0:  # N:M: chosen group by group, from the running W1
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            M1 = unstructured_mask(W1, torch.diag(Hinv1), pattern.sparsity, stack.segments)
        if isinstance(stack.quantizer, SolveGrids):
            stack.quantizer.begin_block(W, Hinv, i1, i2)  # its group fits read the running weights
        Q1, Err1 = block_step(W1, Hinv1, M1)
        W[:, i1:i2] = Q1
        Losses += torch.sum(Err1**2, 1) / 2  # (w - q)^2 / d^2 = err^2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    # The error needs no second product with H: the updates made W - W' = Err U (U = Hinv),
    # so (W - W')(H + damp I)(W - W')^T = Err Err^T = 2 * Losses, row by row.
    delta_sq = ((W_dense - W) ** 2).sum(1)
    data_quad = 2 * Losses - damp * delta_sq  # per row: (w - w') H (w - w')^T without the dampening
    inverse = None if stack.perm is None else torch.argsort(stack.perm)  # back to the original columns
    if inverse is not None:
        W = W[:, inverse]
    grids = stack.quantizer if isinstance(stack.quantizer, SolveGrids) else None
    return [
        PruneResult(
            weight=W[r0:r1],
            loss=Losses[r0:r1].sum().item(),
            error=_ratio(data_quad[r0:r1].sum().item(), dense_quad[r0:r1].sum().item()),
            percdamp=used_percdamp,
            quantized=grids.result(slice(r0, r1), inverse) if grids is not None else None,
        )
        for r0, r1 in stack.segments
    ]


def _ratio(error_quad: float, dense_quad: float) -> float:
    if not math.isfinite(dense_quad) or dense_quad <= 0:
        return 0.0
    return max(error_quad, 0.0) / dense_quad


def relative_error(W_dense: torch.Tensor, W_pruned: torch.Tensor, H: torch.Tensor) -> float:
    """||(W - W') X||^2 / ||W X||^2 from H = (2/n) X X^T (the scale cancels): the baselines' error."""
    W_dense = W_dense.float()
    delta = W_dense - W_pruned.float()
    return _ratio((delta.matmul(H) * delta).sum().item(), (W_dense.matmul(H) * W_dense).sum().item())


def unstructured_mask(
    W1: torch.Tensor, diag1: torch.Tensor, sparsity: float, segments: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """The reference's block mask: score w^2 / [H^-1]_jj^2, ``score <= sorted[int(N * s)]``.

    Computed per layer (row segment), so stacked layers keep their own thresholds.
    """
    score = W1**2 / diag1.reshape(1, -1) ** 2
    M1 = torch.empty_like(W1, dtype=torch.bool)
    for r0, r1 in segments:
        seg = score[r0:r1]
        k = int(seg.numel() * sparsity)
        thresh = torch.kthvalue(seg.flatten().cpu(), k + 1).values.to(seg.device)  # = sort(seg)[k]
        M1[r0:r1] = seg <= thresh
    return M1
