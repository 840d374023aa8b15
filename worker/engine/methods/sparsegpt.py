"""SparseGPT (Frantar & Alistarh 2023) as a registry method: the layers that read one Hessian are
solved together by the arithmetic the driver picked (``prune_shared``: the fast solver, or the
reference's operations with ``solver.exact``; worker.engine.sequential.sparsegpt_arithmetic)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from worker.engine.method_table import MethodInfo, method_info
from worker.engine.sparsegpt import sparsegpt_prune_shared


@dataclass(frozen=True)
class SolverMethod:
    info: MethodInfo

    @torch.no_grad()
    def prune(self, dense: Sequence[torch.Tensor], H: torch.Tensor | None, solver,
              prune_shared: Callable | None = None):
        """(pruned fp32 weights, (error, loss, percdamp, refit) per layer), one joint solve."""
        if H is None:
            raise ValueError(f"method {self.info.name} needs the calibration Hessian")
        solve = prune_shared or sparsegpt_prune_shared
        results = solve(list(dense), H, solver.pattern, blocksize=solver.blocksize, percdamp=solver.percdamp,
                        wbits=solver.wbits)
        return [r.weight for r in results], [(r.error, r.loss, r.percdamp, None) for r in results]


METHOD = SolverMethod(method_info("sparsegpt"))
