"""The pruning methods' registry: one object per method, one module per method.

Each name of ``worker.engine.contract.method_table.METHOD_TABLE`` (what the method needs and allows, torch
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
from dataclasses import replace
from typing import Protocol

import torch

from worker.engine.contract.method_table import METHOD_TABLE, MethodInfo
from worker.engine.quant import QuantizedWeight, round_to_nearest
from worker.engine.refit import refit_layers
from worker.engine.sparsegpt import relative_error

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
) -> tuple[list[torch.Tensor], list[Fit], list[QuantizedWeight] | None]:
    """The layers reading ``H`` pruned with ``solver.method``, then refit when ``solver.refit`` asks
    (and there is a Hessian), then quantized when ``solver.quantization`` is set: the fp32 weights
    (codes x scales when quantized), each layer's fit, and the QuantizedWeights (None: not quantized).

    Quantization happens inside the solve of a method that has one (sparsegpt, without a refit);
    otherwise it is round-to-nearest on the same grid after the prune (and after the refit, the
    mask fixed: zeros stay code 0), each layer's error then measured again on the quantized weights.
    Sparsity 0 (quantization only) prunes nothing: sparsegpt's solve is GPTQ, the others round.
    """
    method = get_method(solver.method)
    quantization = getattr(solver, "quantization", None)
    if quantization is not None and method.info.joint_quantization and solver.refit == "none":
        results = method.solve(dense, H, solver, prune_shared)
        return (
            [r.weight for r in results],
            [(r.error, r.loss, r.percdamp, None) for r in results],
            [r.quantized for r in results],
        )
    if quantization is not None and solver.pattern.sparsity == 0:
        pruned, fits = [W.float() for W in dense], [(None, None, 0.0, None) for _ in dense]
    else:
        pruned, fits = _pruned(method, dense, H, solver, prune_shared)
    if quantization is None:
        return pruned, fits, None
    quantized = [round_to_nearest(P, quantization) for P in pruned]
    errors = [relative_error(W.float(), q.weight, H) if H is not None else None for W, q in zip(dense, quantized)]
    fits = [(err, *fit[1:]) for err, fit in zip(errors, fits)]
    return [q.weight for q in quantized], fits, quantized


def _pruned(method: Method, dense, H, solver, prune_shared):
    if getattr(solver, "quantization", None) is not None and method.info.joint_quantization:
        solver = replace(solver, quantization=None)  # with a refit: solve unquantized, round after
    pruned, fits = method.prune(dense, H, solver, prune_shared)
    if solver.refit != "none" and H is not None:
        pruned, fits = refit_layers(dense, pruned, H, solver.pattern, solver.refit, solver.percdamp, fits)
    return pruned, fits
