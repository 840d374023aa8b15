"""The pruning methods' registry: one object per method, one module per method.

Each name of ``worker.engine.method_table.METHOD_TABLE`` (what the method needs and allows, torch
free) is a module here whose ``METHOD`` has that table row as ``info`` and one prune function,

    METHOD.prune(dense, H, solver, prune_shared) -> (pruned fp32 weights, fits)

for the layers that read one Hessian ``H`` (None: no calibration data), ``fits`` holding per layer
(error, loss, percdamp, refit). The dense driver (worker.engine.sequential.solve_group) and the MoE
experts (worker.engine.moe.prune_experts, one expert's matrix at a time) both call ``prune_layers``:
the method's prune, then the refit the solver asks for. Adding a method: a row in the table, a
module here with its ``METHOD``, and a test.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from worker.engine.method_table import METHOD_TABLE, MethodInfo
from worker.engine.refit import refit_layers

Fit = tuple  # (error | None, loss | None, percdamp, refit record | None) of one layer


class Method(Protocol):
    info: MethodInfo

    def prune(
        self, dense: Sequence[torch.Tensor], H: torch.Tensor | None, solver, prune_shared: Callable | None = None
    ) -> tuple[list[torch.Tensor], list[Fit]]: ...


def _load() -> dict[str, Method]:
    methods = {}
    for name, info in METHOD_TABLE.items():
        method = importlib.import_module(f"{__name__}.{name}").METHOD
        if method.info is not info:
            raise RuntimeError(f"{__name__}.{name}.METHOD describes {method.info.name!r}, not {name!r}")
        methods[name] = method
    return methods


METHODS: dict[str, Method] = _load()


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


@torch.no_grad()
def prune_layers(
    dense: Sequence[torch.Tensor], H: torch.Tensor | None, solver, prune_shared: Callable | None = None
) -> tuple[list[torch.Tensor], list[Fit]]:
    """The layers reading ``H`` pruned with ``solver.method``, then refit when ``solver.refit`` asks
    (and there is a Hessian): the pruned fp32 weights and each layer's fit."""
    pruned, fits = get_method(solver.method).prune(dense, H, solver, prune_shared)
    if solver.refit != "none" and H is not None:
        pruned, fits = refit_layers(dense, pruned, H, solver.pattern, solver.refit, solver.percdamp, fits)
    return pruned, fits
