"""A plan as the API, the page, the CSV and the CLI show it: ``view(plan, jobs)`` -> the plan's JSON.
Pure (no database, no network): the Pareto front and the recommendation are computed here, once,
so that every place that shows a plan agrees.

- Each point's job is the newest retry of the job it names (a retry keeps the plan).
- Quality is the metric the plan compares: perplexity on its first evaluation set (lower is
  better), or, when it has no perplexity set or its budget is an accuracy one, the mean zero-shot
  accuracy over its tasks (each task's ``acc``, else ``acc_norm``, else its first metric; higher is
  better). The dense figures are those of the plan's job that measured the dense model.
- Bytes are each job's default artifact (compressed-tensors for a quantizing job, else the hf-tar of
  the model with its zeros stored: a pruned model without quantization is as large as the dense
  one). The dense model's bytes are a non-quantizing job's artifact (or a quantizing job's ``dense``
  format), so the dense point is drawn once such a job has finished.
- Pareto: among points with bytes and quality (the dense point included), those no other point
  dominates (bytes <= and quality at least as good, one of them strictly).
- Recommended: with a budget, the smallest artifact meeting it (ties: the better quality); without
  one, the smallest Pareto point within +10% of the dense perplexity (1 point of accuracy when the
  plan compares accuracy). The dense point itself is never recommended (nothing to download).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from app import packagers
from app.models import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED
from app.services.plan_points import DENSE, DENSE_KEY, JOB, PENDING, SKIPPED

GRID_PPL_PCT = 10.0  # a grid's recommendation: within +10% of the dense perplexity
GRID_ACC_POINTS = 1.0  # or within 1 point of the dense mean accuracy


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def task_accuracy(metrics: dict[str, Any]) -> float | None:
    """One task's accuracy: acc, else acc_norm, else its first metric that is a number."""
    for name in ("acc", "acc_norm"):
        if _number(metrics.get(name)) is not None:
            return _number(metrics[name])
    for name, value in metrics.items():
        if "stderr" not in name and _number(value) is not None:
            return _number(value)
    return None


def accuracies(per_task: dict[str, Any] | None) -> dict[str, float | None]:
    return {task: task_accuracy(m) for task, m in (per_task or {}).items() if isinstance(m, dict)}


def mean(values: dict[str, float | None]) -> float | None:
    found = [v for v in values.values() if v is not None]
    return sum(found) / len(found) if found else None


def _perplexity(values: dict[str, Any] | None, dataset: str | None) -> float | None:
    values = values or {}
    if dataset in values:
        return _number(values[dataset])
    return _number(next(iter(values.values()), None)) if len(values) == 1 else None


def current_jobs(points: list[dict[str, Any]], jobs: list) -> dict[str, Any]:
    """Each point's job (key -> Job): the one it names, or that job's newest retry."""
    by_id = {job.id: job for job in jobs}
    retries: dict[int, list] = {}
    for job in jobs:
        if job.retry_of is not None:
            retries.setdefault(job.retry_of, []).append(job)
    out = {}
    for point in points:
        job = by_id.get(point.get("job_id") or -1)
        seen = set()
        while job is not None and job.id in retries and job.id not in seen:
            seen.add(job.id)
            job = max(retries[job.id], key=lambda j: j.id)
        if job is not None:
            out[point["key"]] = job
    return out


def dense_figures(jobs: list, dataset: str | None) -> dict[str, Any]:
    """The dense model's perplexity, accuracy and bytes, from the plan's jobs."""
    dense: dict[str, Any] = {"perplexity": {}, "accuracy": {}, "mean_accuracy": None, "bytes": None, "job_id": None}
    for job in jobs:
        if job.status != SUCCEEDED or not isinstance(job.result, dict):
            continue
        result = job.result
        zero_shot = (result.get("zero_shot") or {}).get("dense") or {}
        if dense["job_id"] is None and (result.get("dense_perplexity") or zero_shot):
            dense["perplexity"] = {k: _number(v) for k, v in (result.get("dense_perplexity") or {}).items()}
            dense["accuracy"] = accuracies(zero_shot)
            dense["mean_accuracy"] = mean(dense["accuracy"])
            dense["job_id"] = job.id
    dense["bytes"] = _dense_bytes(jobs)
    return dense


def _dense_bytes(jobs: list) -> int | None:
    """A finished non-quantizing job's artifact (the model with its zeros stored), else a
    quantizing job's ``dense`` format."""
    kept = [j for j in jobs if j.status == SUCCEEDED and j.artifact_expired_at is None]
    for job in kept:
        if not packagers.is_quantizing(job.spec or {}) and job.artifact_size is not None:
            return job.artifact_size
    for job in kept:
        rows = [a for a in job.artifacts if a.format == packagers.DENSE and a.expired_at is None]
        if rows:
            return rows[0].size
    return None


def point_row(point: dict[str, Any], job, dataset: str | None) -> dict[str, Any]:
    row = {k: point.get(k) for k in ("key", "method", "sparsity", "quantization", "refit", "state", "reason")}
    row.update(job_id=None, job_url=None, status=point["state"], perplexity=None, mean_accuracy=None, bytes=None)
    row.update(format=None, download_url=None, ratio=None, quality_change_pct=None, accuracy_drop_points=None)
    row.update(meets_budget=None, pareto=False, recommended=False)
    if job is None:
        return row
    row.update(job_id=job.id, job_url=f"/jobs/{job.id}", status=job.status)
    if job.status == SUCCEEDED:
        result = job.result if isinstance(job.result, dict) else {}
        row["perplexity"] = _perplexity(result.get("perplexity"), dataset)
        row["mean_accuracy"] = mean(accuracies((result.get("zero_shot") or {}).get("pruned")))
        if job.artifact_expired_at is None and job.artifact_sha256 and job.artifact_size is not None:
            row.update(bytes=job.artifact_size, download_url=f"/api/v1/jobs/{job.id}/artifact")
            row["format"] = packagers.default_for(job.spec or {})
    return row


def _quality(row: dict[str, Any], metric: str) -> float | None:
    return row["perplexity"] if metric == "perplexity" else row["mean_accuracy"]


def _better_or_equal(a: float, b: float, metric: str) -> bool:
    return a <= b if metric == "perplexity" else a >= b


def pareto_keys(rows: list[dict[str, Any]], metric: str) -> set[str]:
    """Keys of the rows on the Pareto front (bytes against quality)."""
    known = [r for r in rows if r["bytes"] is not None and _quality(r, metric) is not None]
    front = set()
    for r in known:
        q = _quality(r, metric)
        dominated = any(
            o is not r
            and o["bytes"] <= r["bytes"]
            and _better_or_equal(_quality(o, metric), q, metric)
            and (o["bytes"] < r["bytes"] or _quality(o, metric) != q)
            for o in known
        )
        if not dominated:
            front.add(r["key"])
    return front


def compare_to_dense(row: dict[str, Any], dense: dict[str, Any], dataset: str | None) -> None:
    dense_ppl = _perplexity(dense["perplexity"], dataset)
    if row["perplexity"] is not None and dense_ppl:
        row["quality_change_pct"] = (row["perplexity"] / dense_ppl - 1) * 100
    if row["mean_accuracy"] is not None and dense["mean_accuracy"] is not None:
        row["accuracy_drop_points"] = (dense["mean_accuracy"] - row["mean_accuracy"]) * 100
    if row["bytes"] is not None and dense["bytes"]:
        row["ratio"] = row["bytes"] / dense["bytes"]


def within(row: dict[str, Any], metric: str, limit: float) -> bool | None:
    """Whether the row is within ``limit`` (% of perplexity, or points of accuracy); None: unknown."""
    value = row["quality_change_pct"] if metric == "perplexity" else row["accuracy_drop_points"]
    return None if value is None else value <= limit + 1e-9


def budget_limit(budget: dict[str, Any] | None) -> tuple[str, float] | None:
    if not budget:
        return None
    if budget.get("metric") == "accuracy":
        return "accuracy", float(budget["max_drop_points"])
    return "perplexity", float(budget["max_increase_pct"])


def reason_text(metric: str, limit: float, budget: bool) -> str:
    if metric == "perplexity":
        what = f"perplexity is at most +{limit:g}% of the dense model's"
    else:
        what = f"mean zero-shot accuracy is at most {limit:g} points below the dense model's"
    if budget:
        return f"the smallest artifact whose {what}"
    return f"no budget was set: the smallest artifact on the Pareto front whose {what}"


def live_status(plan, rows: list[dict[str, Any]]) -> str:
    """The plan's status from its points' jobs as they are now (the advancer stores the same):
    cancelled; queued until a job starts; running while a point is pending or a job active;
    succeeded once one job succeeded and nothing is left (failed jobs shown), else failed."""
    if plan.status == CANCELLED or getattr(plan, "cancel_requested", False):
        return CANCELLED
    states = [r["status"] for r in rows if r["state"] == JOB]
    if any(r["state"] == PENDING for r in rows) or any(s in (QUEUED, RUNNING) for s in states):
        return QUEUED if plan.status == QUEUED and all(s == QUEUED for s in states) else RUNNING
    return SUCCEEDED if SUCCEEDED in states else FAILED


def recommend(rows: list[dict[str, Any]], metric: str, limit: float, *, budget: bool) -> dict[str, Any] | None:
    """Mark and return the recommended row: the smallest downloadable artifact meeting the budget,
    or (no budget) on the Pareto front within ``limit``; ties: the better quality."""
    candidates = [
        r
        for r in rows
        if r["key"] != DENSE_KEY
        and r["download_url"]
        and (r["meets_budget"] if budget else r["pareto"] and within(r, metric, limit))
    ]
    sign = 1 if metric == "perplexity" else -1
    best = min(candidates, key=lambda r: (r["bytes"], sign * _quality(r, metric)), default=None)
    if best is not None:
        best["recommended"] = True
    return best


def view(plan, jobs: list) -> dict[str, Any]:
    """The plan's JSON (the API's GET /plans/{id}, the page's embedded data, the CSV and the CLI)."""
    base = plan.base or {}
    datasets = (base.get("evaluation") or {}).get("datasets") or []
    dataset = datasets[0] if datasets else None
    limit = budget_limit(plan.budget)
    metric = limit[0] if limit else ("perplexity" if dataset else "accuracy")
    dense = dense_figures(jobs, dataset)
    linked = current_jobs(plan.points or [], jobs)
    rows = []
    for point in plan.points or []:
        row = point_row(point, linked.get(point["key"]), dataset)
        if point["state"] == DENSE:
            row["perplexity"] = _perplexity(dense["perplexity"], dataset)
            row["mean_accuracy"] = dense["mean_accuracy"]
            row["bytes"] = dense["bytes"]
        compare_to_dense(row, dense, dataset)
        if limit and row["state"] == JOB and row["status"] == SUCCEEDED:
            row["meets_budget"] = within(row, *limit)
        rows.append(row)
    front = pareto_keys(rows, metric)
    for row in rows:
        row["pareto"] = row["key"] in front
    wanted = limit or (metric, GRID_PPL_PCT if metric == "perplexity" else GRID_ACC_POINTS)
    best = recommend(rows, metric, wanted[1], budget=bool(limit))
    counts = dict.fromkeys((PENDING, QUEUED, RUNNING, SUCCEEDED, "failed", "cancelled", SKIPPED), 0)
    for row in rows:
        if row["state"] != DENSE:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
    return {
        "id": plan.id,
        "url": f"/plans/{plan.id}",
        "api_url": f"/api/v1/plans/{plan.id}",
        "name": plan.name,
        "owner": plan.owner.name if plan.owner is not None else None,
        "model": plan.model,
        "mode": plan.mode,
        "budget": plan.budget,
        "priority": plan.priority,
        "status": live_status(plan, rows),
        "created_at": plan.created_at.isoformat() if plan.created_at else None,
        "finished_at": plan.finished_at.isoformat() if plan.finished_at else None,
        "dense": dense,
        "metric": metric,
        "dataset": dataset,
        "points": rows,
        "recommended": {"key": best["key"], "job_id": best["job_id"], "download_url": best["download_url"]}
        if best
        else None,
        "recommendation_reason": reason_text(*wanted, budget=bool(limit)),
        "counts": counts,
    }


CSV_COLUMNS = (
    "key method sparsity quantization refit state status job_id perplexity mean_accuracy bytes ratio "
    "quality_change_pct accuracy_drop_points meets_budget pareto recommended format download_url reason"
).split()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"{value:.6g}" if isinstance(value, float) else str(value)  # a number is no formula
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text  # no formula in a spreadsheet


def table_csv(data: dict[str, Any]) -> str:
    """The plan's table (``view``'s points) as CSV: a header row, one row per point."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in data["points"]:
        writer.writerow([_cell(row.get(column)) for column in CSV_COLUMNS])
    return out.getvalue()
