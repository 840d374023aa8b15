"""The pruning methods by name, and what each needs and allows: the one list of method names.

The spec's ``method`` choices (so the API's schema, the form's select and the CLI's ``--method``),
its checks of the solver options against the method, the memory estimate and the benchmarks all
read this table. The prune functions themselves (torch) are in ``worker.engine.methods``, one
module per method, each registered under a name of this table.

Pure Python: importing this module loads no torch (the API imports it through the spec).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MethodInfo:
    """What a method needs of the calibration data and which of the solver's options it allows."""

    name: str
    summary: str  # a few words for the spec's description (API docs, form help, CLI --help)
    # what its prune reads of the calibration inputs: the whole Hessian H = (2/n) X X^T, only its
    # diagonal (the inputs' squared norms), or nothing. (A method that reads anything is run with the
    # full Hessian collected: the report's errors and the refit use it.)
    statistics: Literal["hessian", "diag", "none"]
    joint_quantization: bool = False  # solver.wbits: weights quantized inside its solve (paper section 5)
    exact: bool = False  # solver.exact: a reference arithmetic it reproduces bit for bit
    nm: bool = True  # N:M patterns (every method so far: the pattern's groups along the input dimension)
    blocks_of_m: bool = False  # N:M needs solver.blocksize to be a multiple of M (its solve goes by column blocks)

    @property
    def needs_calibration(self) -> bool:
        return self.statistics != "none"

    @property
    def allows_refit(self) -> bool:
        """The refit re-solves the kept weights on the calibration Hessian: it needs the data."""
        return self.needs_calibration


METHOD_TABLE: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo(
            "sparsegpt",
            "SparseGPT's solve, the kept weights updated for the pruned ones",
            statistics="hessian",
            joint_quantization=True,
            exact=True,
            blocks_of_m=True,
        ),
        MethodInfo("wanda", "|W_ij| x ||X_j||, lowest per output row", statistics="diag"),
        MethodInfo("magnitude", "smallest |W_ij| per layer, no calibration data", statistics="none"),
        MethodInfo("ria", "relative importance x ||X_j||^0.5, lowest per layer", statistics="diag"),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(METHOD_TABLE)  # the default method is the first
DEFAULT_METHOD = METHOD_NAMES[0]


def method_info(name: str) -> MethodInfo:
    try:
        return METHOD_TABLE[name]
    except KeyError:
        raise ValueError(f"method {name!r}: use one of {', '.join(METHOD_NAMES)}") from None


def names_where(allowed: str) -> str:
    """The methods with an ``allowed`` capability in words: "sparsegpt only", "sparsegpt, wanda or ria"."""
    names = [m.name for m in METHOD_TABLE.values() if getattr(m, allowed)]
    return f"{names[0]} only" if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def describe_methods() -> str:
    """The spec's description of ``method``: each name with its summary."""
    return "the pruning method: " + "; ".join(f"{m.name}: {m.summary}" for m in METHOD_TABLE.values())


def check_solver_options(name: str, solver, pattern, quantization=None) -> None:
    """ValueError unless method ``name`` allows the spec's ``solver`` options (wbits, exact, refit,
    blocksize: worker.engine.contract.spec.SolverSpec) with its sparsity ``pattern`` (a SparsityPattern) and
    ``quantization`` (the spec's section or None; its own refusals: worker.engine.contract.spec_quant)."""
    method = method_info(name)
    if solver.wbits is not None and not method.joint_quantization:
        raise ValueError(f"solver.wbits (joint quantization) works with method {names_where('joint_quantization')}")
    if solver.exact and not method.exact:
        raise ValueError(
            f"solver.exact reproduces the reference SparseGPT: it works with method {names_where('exact')}"
        )
    if solver.refit != "none" and (not method.allows_refit or solver.wbits is not None):
        raise ValueError(
            f"solver.refit {solver.refit} needs the calibration Hessian and unquantized weights: it "
            f"works with method {names_where('allows_refit')}, without solver.wbits"
        )
    if solver.refit != "none" and quantization is not None and pattern.sparsity == 0:
        raise ValueError(
            f"solver.refit {solver.refit} re-solves the weights a prune kept: quantization only "
            "prunes nothing (set refit none)"
        )
    if pattern.structured and not method.nm:
        raise ValueError(f"method {name} prunes unstructured only, not {pattern}")
    if pattern.structured and method.blocks_of_m and solver.blocksize % pattern.m:
        raise ValueError(f"solver.blocksize {solver.blocksize} must be a multiple of M={pattern.m} for {pattern}")
