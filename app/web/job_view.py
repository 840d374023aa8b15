"""What one job's page shows, computed from the job and its report: the spec over the defaults,
the per-block series and charts, how long it ran and the whole model's sparsity (the compare page
uses them too)."""

from __future__ import annotations

import math
from typing import Any

from app.models import TERMINAL, Job
from app.web.charts import bar_chart, profile_chart
from worker.engine.contract.report import Report
from worker.engine.contract.spec import JobSpec

FLAT = 0.0005  # per-block sparsities closer than 0.05 points draw a flat chart: said in words instead


def spec_view(spec: dict[str, Any] | None) -> dict[str, Any]:
    """The stored spec over the spec's defaults, so that every field has a value to show (a job
    stored before a section existed shows that section's defaults)."""
    merged = JobSpec(model="org/model", sparsity=0.5).model_dump(mode="json")
    for key, value in (spec or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def block_series(job: Job) -> tuple[list[int], list[float], list[float | None]]:
    """Per block: mean achieved sparsity and mean relative reconstruction error of its modules."""
    blocks: dict[int, list] = {}
    for module in job.modules:
        blocks.setdefault(module.block, []).append(module)
    order = sorted(blocks)
    sparsity = [sum(m.sparsity for m in blocks[b]) / len(blocks[b]) for b in order]
    errors = []
    for b in order:
        values = [m.error for m in blocks[b] if m.error is not None and math.isfinite(m.error)]
        errors.append(sum(values) / len(values) if values else None)
    return order, sparsity, errors


def report_of(job: Job) -> Report:
    """The job's stored result as the engine's report (empty until it succeeds)."""
    return Report.load(job.result) or Report()


def job_charts(job: Job, report: Report) -> dict[str, Any]:
    blocks, sparsity, errors = block_series(job)
    if not blocks:
        return {}
    labels = [str(b) for b in blocks]
    charts: dict[str, Any] = {
        "error": bar_chart(
            labels,
            errors,
            title="Relative reconstruction error per block (mean of its modules)",
            value_format="{:.3g}",
            css="bar-error",
        ),
    }
    if max(sparsity) - min(sparsity) < FLAT:  # every block alike (2:4, a uniform ratio): a sentence, not a flat chart
        charts["flat_sparsity"] = sum(sparsity) / len(sparsity)
    else:
        charts["sparsity"] = bar_chart(
            labels,
            [100 * s for s in sparsity],
            title="Achieved sparsity per block (%)",
            y_max=100,
            value_format="{:.1f}%",
            css="bar-sparsity",
        )
    profile = profile_chart(report.profile)  # target vs achieved, per block; None when every target is the same
    if profile is not None:
        charts["profile"] = profile
    return charts


def ran_for(job: Job) -> float | None:
    """Seconds from the (last attempt's) start to the end of a finished job; None while it runs."""
    if job.status not in TERMINAL or job.started_at is None or job.finished_at is None:
        return None
    return max(0.0, (job.finished_at - job.started_at).total_seconds())


def whole_model_sparsity(report: Report) -> float | None:
    """Zeros over every parameter of the model (embeddings, head and norms too), from the report's coverage."""
    cov = report.coverage
    if cov is None or report.sparsity is None or not cov.weights or not cov.model_parameters:
        return None
    return report.sparsity * cov.weights / cov.model_parameters
