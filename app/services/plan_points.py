"""A plan's points: the candidate settings expanded from a grid or a budget, their order, each
point's job spec, and the budget search's skip rule. Pure functions (no database), unit-tested.

- A point is ``{"key", "method", "sparsity", "quantization", "refit", "state", "job_id", "reason"}``.
  Its key is stable and unique in the plan: ``sparsegpt-0.5-W4A16``, ``wanda-2:4-none-refit``.
- Sparsity 0 without quantization is the dense model: one point (key ``dense``, state ``dense``)
  whatever the methods and refit, and no job. At sparsity 0 refit has nothing to re-solve, so
  ``refit on`` there is the same job as ``refit off`` and is dropped as a duplicate.
- A budget's points are ordered by size: the scheme's bits descending (none = the weights' dtype
  bits: 16, or 32 with dtype float32), then sparsity ascending (an N:M pattern after the ratio of
  the same sparsity: it constrains more), then the methods and refit in the order given.
- When a job misses the budget, every pending point of the same method and refit that is at least
  as compressed (bits <= and sparsity >=) is skipped: it would miss too.
"""

from __future__ import annotations

import copy
from typing import Any

from app.plan_schemas import PlanIn
from worker.engine.contract.patterns import parse_sparsity
from worker.engine.contract.spec_quant import DEFAULT_GROUP_SIZE, SCHEME_BITS

DENSE_KEY = "dense"
PENDING, JOB, SKIPPED, DENSE = "pending", "job", "skipped", "dense"
MISSED = "a less compressed setting of the same method ({key}) already missed the budget"


def point_key(method: str, sparsity: str, quantization: str | None, refit: bool) -> str:
    if sparsity == "0" and quantization is None:
        return DENSE_KEY
    return f"{method}-{sparsity}-{quantization or 'none'}" + ("-refit" if refit else "")


def label(point: dict[str, Any], group_size: int | None = None) -> str:
    """A point in words for messages: "2:4 x W4A16 group 128 (sparsegpt, refit)"."""
    if point["key"] == DENSE_KEY:
        return "the dense model"
    quant = point["quantization"] or "no quantization"
    if point["quantization"] in ("W4A16", "W8A16"):
        quant += f" group {group_size if group_size is not None else DEFAULT_GROUP_SIZE}"
    extras = point["method"] + (", refit" if point["refit"] else "")
    return f"{point['sparsity']} x {quant} ({extras})"


def sparsity_value(sparsity: str) -> float:
    return 0.0 if sparsity == "0" else parse_sparsity(sparsity).sparsity


def bits(quantization: str | None, dtype: str) -> int:
    if quantization is None:
        return 32 if dtype == "float32" else 16
    return SCHEME_BITS[quantization]


def size_order(point: dict[str, Any], dtype: str) -> tuple:
    """Larger first: bits descending, then sparsity ascending (N:M after the ratio)."""
    return (-bits(point["quantization"], dtype), sparsity_value(point["sparsity"]), ":" in point["sparsity"])


def expand(body: PlanIn) -> list[dict[str, Any]]:
    """The plan's points in the order they are queued: the grid's nesting order (sparsity, then
    method, scheme, refit), or a budget's by size; duplicates dropped; the dense point first."""
    cand = body.candidates
    points: dict[str, dict[str, Any]] = {}
    for sparsity in cand.sparsities:
        for method in cand.methods:
            for quantization in cand.quantization:
                for refit in cand.refit:
                    refit = refit and sparsity != "0"  # nothing pruned: nothing to refit
                    key = point_key(method, sparsity, quantization, refit)
                    if key in points:
                        continue
                    dense = key == DENSE_KEY
                    points[key] = {
                        "key": key,
                        "method": method,
                        "sparsity": sparsity,
                        "quantization": quantization,
                        "refit": refit,
                        "state": DENSE if dense else PENDING,
                        "job_id": None,
                        "reason": None,
                    }
    ordered = [*points.values()]
    if body.budget is not None:
        ordered.sort(key=lambda p: size_order(p, body.dtype))  # stable: the lists' order breaks ties
    return sorted(ordered, key=lambda p: p["key"] != DENSE_KEY)


def base_spec(body: PlanIn) -> dict[str, Any]:
    """What every job of the plan shares (the plan's ``base``): the spec without method, sparsity,
    quantization scheme and refit, plus the quantization's group size and act order."""
    return {
        "model": body.model,
        "revision": body.revision,
        "trust_remote_code": body.trust_remote_code,
        "dtype": body.dtype,
        "calibration": body.calibration.model_dump(mode="json"),
        "evaluation": body.evaluation.model_dump(mode="json"),
        "solver": body.solver.model_dump(mode="json"),
        "layers": body.layers.model_dump(mode="json"),
        "group_size": body.group_size,
        "actorder": body.actorder,
    }


def job_spec(base: dict[str, Any], point: dict[str, Any], *, dense: bool) -> dict[str, Any]:
    """The job spec (as JSON, for ``JobSpec.model_validate``) of one point; ``dense``: the job also
    measures the dense model (perplexity and zero-shot), which the plan's other jobs then share."""
    spec = copy.deepcopy({k: v for k, v in base.items() if k not in ("group_size", "actorder")})
    spec["method"] = point["method"]
    spec["sparsity"] = point["sparsity"]
    spec["solver"]["refit"] = "reconstruct" if point["refit"] else "none"
    spec["evaluation"]["dense"] = dense
    scheme = point["quantization"]
    if scheme is None:
        spec["quantization"] = None
    else:
        quantization: dict[str, Any] = {"scheme": scheme, "actorder": bool(base.get("actorder"))}
        if base.get("group_size") is not None:
            quantization["group_size"] = base["group_size"]  # FP8_DYNAMIC without one: per channel
        spec["quantization"] = quantization
    return spec


def compressed_at_least(point: dict[str, Any], than: dict[str, Any], dtype: str) -> bool:
    """``point`` is at least as compressed as ``than``: no more bits and no less sparsity."""
    return bits(point["quantization"], dtype) <= bits(than["quantization"], dtype) and sparsity_value(
        point["sparsity"]
    ) >= sparsity_value(than["sparsity"])


def skip_after_miss(points: list[dict[str, Any]], missed: dict[str, Any], dtype: str) -> list[str]:
    """Mark skipped every pending point of ``missed``'s method and refit that is at least as
    compressed; returns their keys (``points`` is changed in place)."""
    skipped = []
    for point in points:
        if (
            point["state"] == PENDING
            and point["method"] == missed["method"]
            and point["refit"] == missed["refit"]
            and compressed_at_least(point, missed, dtype)
        ):
            point["state"] = SKIPPED
            point["reason"] = MISSED.format(key=missed["key"])
            skipped.append(point["key"])
    return skipped
