"""SparseGPT (Frantar & Alistarh 2023) as a registry method: the layers that read one Hessian are
solved together, by the fast solver or, with ``solver.exact``, by the reference's operations
(``sparsegpt_arithmetic``, which the driver also asks for the Hessian accumulator it needs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from worker.engine.contract.method_table import MethodInfo, method_info
from worker.engine.reference import RunningHessian, reference_prune_shared
from worker.engine.sparsegpt import Hessian, PruneResult, sparsegpt_prune_shared


class Arithmetic(NamedTuple):
    """How SparseGPT's numbers are computed: the Hessian accumulator and the solve of a Hessian group."""

    hessian: Callable[[int, torch.device], Hessian | RunningHessian]  # (columns, device)
    prune_shared: Callable[..., list[PruneResult]]  # sparsegpt_prune_shared's signature


def sparsegpt_arithmetic(solver) -> Arithmetic:
    """The fast solver, or with ``solver.exact`` the reference's operations (worker.engine.reference),
    which reproduce benchmarks/reference_sparsegpt.py bit for bit. The one place ``exact`` is read."""
    if solver.exact:
        return Arithmetic(hessian=RunningHessian, prune_shared=reference_prune_shared)
    return Arithmetic(hessian=Hessian, prune_shared=sparsegpt_prune_shared)


@dataclass(frozen=True)
class SolverMethod:
    info: MethodInfo

    @torch.no_grad()
    def solve(
        self, dense: Sequence[torch.Tensor], H: torch.Tensor | None, solver, prune_shared: Callable | None = None
    ) -> list[PruneResult]:
        """One joint solve with ``prune_shared`` (default: ``sparsegpt_arithmetic(solver)``'s); with
        ``solver.quantization`` the grids are fitted and applied inside it (``PruneResult.quantized``)."""
        if H is None:
            raise ValueError(f"method {self.info.name} needs the calibration Hessian")
        solve = prune_shared or sparsegpt_arithmetic(solver).prune_shared
        quantization = getattr(solver, "quantization", None)
        extra = {"quantization": quantization} if quantization is not None else {}
        return solve(
            list(dense),
            H,
            solver.pattern,
            blocksize=solver.blocksize,
            percdamp=solver.percdamp,
            wbits=solver.wbits,
            **extra,
        )

    def prune(
        self, dense: Sequence[torch.Tensor], H: torch.Tensor | None, solver, prune_shared: Callable | None = None
    ):
        """(pruned fp32 weights, (error, loss, percdamp, refit) per layer), one joint solve."""
        results = self.solve(dense, H, solver, prune_shared)
        return [r.weight for r in results], [(r.error, r.loss, r.percdamp, None) for r in results]


METHOD = SolverMethod(method_info("sparsegpt"))
