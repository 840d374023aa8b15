"""The reference SparseGPT's arithmetic, operation for operation: the engine's bit-for-bit mode.

The yardstick is benchmarks/reference_sparsegpt.py (the reference procedure, plainly). With the
same calibration inputs, a layer solved here gets that procedure's weights bit for bit, on the
same machine and library. The steps are the fast solver's (``worker.engine.sparsegpt.solve``);
only the arithmetic differs, and every difference is slower:

- ``RunningHessian``: the running average ``H *= n/(n+b); H += (sqrt(2/n) X)(sqrt(2/n) X)^T``,
  rescaled on every batch with the full product X X^T (the fast ``Hessian`` sums upper tiles
  and scales once);
- ``reference_inverse_factor``: the dampening computed in fp32 and the chain cholesky ->
  cholesky_inverse -> cholesky(upper) (the fast one: a Python-float dampening, one
  factorization);
- ``reference_prune_shared``: each layer solved alone (a GEMM's rounding may depend on the
  rows it is given), every block one column at a time with the reference's loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch

from worker.engine.block_steps import block_column_loop
from worker.engine.contract.patterns import SparsityPattern
from worker.engine.quant import Quantization
from worker.engine.sparsegpt import LayerStack, PruneResult, dampened_factor, solve


class RunningHessian:
    """H = (2/n) sum_x x x^T kept as the reference keeps it: a running average, n counting sequences."""

    def __init__(self, columns: int, device: torch.device | str):
        self._H = torch.zeros(columns, columns, dtype=torch.float32, device=device)  # (cols, cols)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """``x``: the layer's input for ``b`` sequences, shape (b, seq, cols) or (b, cols)."""
        batch = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).t()  # (cols, tokens)
        self._H *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        x = math.sqrt(2 / self.nsamples) * x.float()
        self._H += x.matmul(x.t())

    @property
    def H(self) -> torch.Tensor:
        if self.nsamples == 0:
            raise ValueError("the Hessian has seen no calibration data")
        return self._H


def _reference_upper_cholesky_of_inverse(H: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The reference's own chain: cholesky -> cholesky_inverse -> cholesky(upper)."""
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        return L, False
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    return U, info.item() == 0


def reference_inverse_factor(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, float]:
    """``inverse_hessian_factor`` with the reference's operations: damp = percdamp * mean(diag(H))
    as an fp32 tensor, then its three factorizations (retried with more dampening as there)."""
    return dampened_factor(H, percdamp, torch.mean(torch.diag(H)), _reference_upper_cholesky_of_inverse)


@torch.no_grad()
def reference_prune_shared(
    weights: Sequence[torch.Tensor],
    H: torch.Tensor,
    pattern: SparsityPattern,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    wbits: int | None = None,
    quantization: Quantization | None = None,
) -> list[PruneResult]:
    """``sparsegpt_prune_shared``'s contract with the reference's arithmetic, one layer at a time.

    Each layer of ``weights`` (they all read ``H``) is solved alone: its own dampening and
    factorization of H, and the reference's column loop in every block (with joint
    quantization when ``wbits`` is set). Slower; with the H of ``RunningHessian`` the
    weights are the reference procedure's, bit for bit.
    """
    if quantization is not None:  # the reference has no group-wise grids: nothing to be exact to
        raise ValueError("the reference arithmetic (exact) has no group-wise quantization: use the fast solver")
    results = []
    for w in weights:
        stack = LayerStack.of([w], H, wbits)
        step = partial(block_column_loop, pattern=pattern, quantizer=stack.quantizer)
        results += solve(
            stack, pattern, blocksize=blocksize, percdamp=percdamp, factorize=reference_inverse_factor, block_step=step
        )
    return results
