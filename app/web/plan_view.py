"""How a plan's JSON (``app.services.plans.view``) reads on its page: a point's setting in words,
the figures of its table row, the chart's summary line. Pure functions of that dict, so the
page, its tests and the script that refreshes it read the same values."""

from __future__ import annotations

import math
from typing import Any

from app.web.filters import fmt_bytes, fmt_ppl

ACTIVE_PLAN = ("queued", "running")
# The plan pages' Content-Security-Policy: only this server's script files run (the plan's JSON
# is embedded as data, never as script), no plugins, no <base>, forms post only here.
PLAN_CSP = "script-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
DASH = "–"


def sparsity_text(sparsity: Any) -> str:
    """ "0.5" -> "50%", "2:4" -> "2:4", "0" -> "dense"."""
    text = str(sparsity)
    if ":" in text:
        return text
    try:
        value = float(text)
    except ValueError:
        return text
    if value == 0:
        return "dense"
    return f"{value * 100:g}%"


def setting(point: dict[str, Any]) -> str:
    """A point's setting in words: "sparsegpt · 50% · W4A16 · refit" ("dense model" for the reference)."""
    if point.get("state") == "dense":
        return "dense model"
    sparsity = sparsity_text(point.get("sparsity"))
    parts = [point.get("method") or ""]
    parts.append("no pruning" if sparsity == "dense" else sparsity)
    parts.append(point.get("quantization") or "no quantization")
    if point.get("refit"):
        parts.append("refit")
    return " · ".join(p for p in parts if p)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def change(pct: Any) -> str:
    """+3.2% / -1.0% (perplexity against the dense model's)."""
    value = _number(pct)
    return DASH if value is None else f"{value:+.1f}%"


def ratio(value: Any) -> str:
    value = _number(value)
    return DASH if value is None else f"×{value:.2f}"


def accuracy(value: Any) -> str:
    """A mean accuracy (0..1) as a percentage."""
    value = _number(value)
    return DASH if value is None else f"{100 * value:.1f}%"


def drop(points: Any) -> str:
    value = _number(points)
    return DASH if value is None else f"{value:.1f} pts"


def yes_no(value: Any) -> str:
    return DASH if value is None else ("yes" if value else "no")


def size(value: Any) -> str:
    return fmt_bytes(value) if isinstance(value, int) else DASH


def perplexity(value: Any) -> str:
    return fmt_ppl(_number(value))


def budget_text(plan: dict[str, Any]) -> str:
    """The plan's budget in words ("" for a grid)."""
    budget = plan.get("budget") or {}
    if budget.get("metric") == "perplexity" and budget.get("max_increase_pct") is not None:
        return f"perplexity at most +{budget['max_increase_pct']:g}% of the dense model's"
    if budget.get("metric") == "accuracy" and budget.get("max_drop_points") is not None:
        return f"zero-shot accuracy at most {budget['max_drop_points']:g} points below the dense model's"
    return ""


def recommended_point(plan: dict[str, Any]) -> dict[str, Any] | None:
    """The point the plan recommends (its entry in ``points``), or None."""
    chosen = plan.get("recommended") or {}
    return next((p for p in plan.get("points") or [] if chosen and p.get("key") == chosen.get("key")), None)


def dense_perplexity(plan: dict[str, Any]) -> float | None:
    """The dense model's perplexity on the plan's dataset (the chart's reference line)."""
    figures = (plan.get("dense") or {}).get("perplexity") or {}
    value = figures.get(plan.get("dataset")) if plan.get("dataset") in figures else next(iter(figures.values()), None)
    return _number(value)


HELPERS = {
    "setting": setting,
    "change": change,
    "ratio": ratio,
    "accuracy": accuracy,
    "drop": drop,
    "yes_no": yes_no,
    "size": size,
    "perplexity": perplexity,
    "budget_text": budget_text,
    "sparsity_text": sparsity_text,
}


def page_context(plan: dict[str, Any]) -> dict[str, Any]:
    """What templates/plan.html reads besides the plan itself."""
    return {
        "plan": plan,
        "fmt": HELPERS,
        "active": plan.get("status") in ACTIVE_PLAN,
        "chosen": recommended_point(plan),
        "dense_ppl": dense_perplexity(plan),
        "budget": budget_text(plan),
        "quantized_any": any(p.get("quantization") for p in plan.get("points") or []),
    }
