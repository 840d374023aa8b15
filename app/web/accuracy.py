"""Zero-shot accuracy (the report's ``zero_shot``, from lm-evaluation-harness) as the rows
the job page and the compare page show: one per task and metric (acc, acc_norm, ...), dense and
pruned as percentages, the change in points, the pruned value's standard error."""

from __future__ import annotations

import math
from typing import Any

from worker.engine.contract.report import Report, ZeroShot


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _metrics(values: dict[str, Any]) -> list[str]:
    return [m for m in values if not m.endswith("_stderr") and "_stderr," not in m and _number(values[m]) is not None]


def job_rows(zero_shot: ZeroShot | None) -> list[dict[str, Any]]:
    """The job page's table: task, metric, dense, pruned, pruned - dense (points), ± stderr."""
    if zero_shot is None:
        return []
    dense, pruned, examples = zero_shot.dense, zero_shot.pruned, zero_shot.examples
    rows = []
    for task in list(dict.fromkeys([*pruned, *dense])):
        values = pruned.get(task) or {}
        before_values = dense.get(task) or {}
        for metric in list(dict.fromkeys([*_metrics(values), *_metrics(before_values)])):
            after, before = _number(values.get(metric)), _number(before_values.get(metric))
            stderr = _number(values.get(f"{metric}_stderr"))
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "dense": _pct(before),
                    "pruned": _pct(after),
                    "change": "–" if after is None or before is None else f"{100 * (after - before):+.2f}",
                    "stderr": None if stderr is None else f"±{100 * stderr:.2f}",
                    "examples": examples.get(task),
                }
            )
    return rows


def compare_rows(reports: list[Report]) -> list[dict[str, Any]]:
    """The compare page's table from the jobs' reports: per task and metric, each job's row
    (None: the job did not run that task)."""
    per_job = [{(r["task"], r["metric"]): r for r in job_rows(report.zero_shot)} for report in reports]
    keys = list(dict.fromkeys(key for rows in per_job for key in rows))
    return [
        {"task": task, "metric": metric, "values": [rows.get((task, metric)) for rows in per_job]}
        for task, metric in keys
    ]
