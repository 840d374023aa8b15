"""The dashboard's pages (GET): the jobs table (/), the new-job form (/jobs/new), one job
(/jobs/{id}) and a comparison (/compare?ids=1,2). Each reads through ``app.crud`` and
``app.services.jobs`` and renders a template; bad ids and queries are 4xx pages, never a 500."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from app import crud, packagers
from app.models import STATUSES, TERMINAL, Job
from app.services import jobs
from app.web import forms
from app.web.accuracy import compare_rows, job_rows
from app.web.charts import line_chart
from app.web.filters import fmt_bytes, fmt_duration, fmt_secs, progress_view
from app.web.job_view import block_series, job_charts, ran_for, report_of, spec_view, whole_model_sparsity
from app.web.queue_view import history, standings
from app.web.render import current_user, error_page, open_session, parse_job_id, render
from worker.engine.contract.hub import dataset_unavailable
from worker.engine.contract.report import facts
from worker.engine.contract.spec_sections import BUILTIN_DATASETS

router = APIRouter(include_in_schema=False)
PAGE_SIZE = 20
MAX_COMPARED = 12


# --- the jobs table --------------------------------------------------------------------------------


def _disk(session: Session, data_dir: Path) -> dict[str, Any]:
    artifacts, artifact_bytes = crud.artifact_totals(session)
    try:
        usage = shutil.disk_usage(data_dir)
        free, total = usage.free, usage.total
    except OSError:
        free = total = None
    return {"artifacts": artifacts, "artifact_bytes": artifact_bytes, "free": free, "total": total}


@router.get("/", response_class=HTMLResponse)
def jobs_page(request: Request, status: str = "", page: str = "1") -> HTMLResponse:
    status = status.strip()
    if status and status not in STATUSES:
        return error_page(
            request, 400, "Unknown status", f"{status!r} is not a job status; use one of {', '.join(STATUSES)}."
        )
    page_no = int(page) if page.strip().isdigit() and 0 < int(page) < 10**6 else 1
    r = request.app.state.redis
    with open_session(request) as session:
        items, total = crud.jobs_page(session, status=status or None, limit=PAGE_SIZE, offset=(page_no - 1) * PAGE_SIZE)
        counts = crud.status_counts(session)
        standing = (
            standings(session, r, request.app.state.settings.queue, lambda job: jobs.live_progress(r, job))
            if any(job.status == "queued" for job in items)
            else {}
        )
        rows = [
            {
                "job": job,
                "progress": progress_view(jobs.live_progress(r, job)),
                "extras": spec_extras(job.spec),
                "standing": standing.get(job.id),
                "metric": job.metrics[0] if job.metrics else None,
            }
            for job in items
        ]
        return render(
            request,
            "jobs.html",
            {
                "rows": rows,
                "total": total,
                "status": status,
                "page": page_no,
                "pages": max(1, math.ceil(total / PAGE_SIZE)),
                "counts": counts,
                "all_count": sum(counts.values()),
                "disk": _disk(session, request.app.state.settings.data_dir),
                "page_size": PAGE_SIZE,
            },
        )


def spec_extras(spec: dict[str, Any] | None) -> list[str]:
    """What a job does beyond method and pattern, in short words: its refit and its quantization."""
    spec = spec or {}
    solver, quant = spec.get("solver") or {}, spec.get("quantization") or {}
    out = []
    if solver.get("refit") not in (None, "none"):
        out.append(f"refit {solver['refit']}")
    if isinstance(quant, dict) and quant.get("scheme"):
        group = quant.get("group_size")
        out.append(
            quant["scheme"]
            + (f" g{group}" if isinstance(group, int) and group > 0 else "")
            + (" actorder" if quant.get("actorder") else "")
        )
    elif solver.get("wbits"):
        out.append(f"{solver['wbits']}-bit")
    return out


def quantization_only(spec: dict[str, Any] | None) -> bool:
    """A job that quantizes and prunes nothing (sparsity 0): the page calls it that."""
    spec = spec or {}
    try:
        return bool((spec.get("quantization") or {}).get("scheme")) and float(spec.get("sparsity")) == 0
    except (TypeError, ValueError):  # an N:M pattern
        return False


# --- the new-job form (what it posts: app.web.actions) -------------------------------------------------


def form_page(
    request: Request,
    session: Session,
    values: dict[str, Any],
    errors: dict[str, list[str]],
    *,
    status_code: int = 200,
    server_defaults: bool = False,
    **extra: Any,
) -> HTMLResponse:
    """The new-job form with these values and errors (by input name; "" for the whole form);
    ``server_defaults``: the values are the defaults, fitted to what this server can load."""
    uploads = crud.list_calibration_sets(session, limit=100)
    unavailable = unavailable_sets()
    if server_defaults:
        values = offline_defaults(values, unavailable, bool(uploads))
    context = {
        "form": values,
        "errors": errors,
        "uploads": uploads,
        "choices": forms.CHOICES,
        "helps": forms.HELP,
        "builtin": BUILTIN_DATASETS,
        "allowed_dirs": [str(d) for d in request.app.state.settings.allowed_dirs],
        "unavailable": unavailable,
        "paces": past_paces(session),
        **extra,
    }
    return render(request, "new_job.html", context, status_code=status_code)


def unavailable_sets() -> dict[str, str]:
    """The built-in sets this server cannot load now (offline or no Hub, and not cached), with why."""
    return {name: why for name in BUILTIN_DATASETS if (why := dataset_unavailable(name))}


def past_paces(session: Session) -> list[dict[str, Any]]:
    """This server's past jobs per model: its blocks, seconds per block, and so about how long a
    job of it takes here (the form shows them beside the model field)."""
    return [
        {
            "model": model,
            "blocks": pace.blocks,
            "per_block": pace.seconds_per_block,
            "total": pace.seconds_per_block * pace.blocks,
        }
        for model, pace in sorted(history(session).items())
    ]


def offline_defaults(values: dict[str, Any], unavailable: dict[str, str], has_uploads: bool) -> dict[str, Any]:
    """The form's defaults on this server: no built-in set it cannot load is picked for the user."""
    values = dict(values)
    if values.get("calibration_source") in unavailable:
        values["calibration_source"] = "upload" if has_uploads else "file"
    values["eval_sets"] = [d for d in values.get("eval_sets") or [] if d not in unavailable]
    return values


# Declared before /jobs/{job_id}, which would otherwise take "new" as a job id.
@router.get("/jobs/new", response_class=HTMLResponse)
def new_job_page(request: Request, clone: str = "") -> HTMLResponse:
    with open_session(request) as session:
        if not clone:
            return form_page(request, session, dict(forms.FORM_DEFAULTS), {}, server_defaults=True)
        job_id = parse_job_id(clone)
        job = crud.get_job(session, job_id) if job_id else None
        if job is None:
            return error_page(request, 404, "Job not found", f"There is no job {clone!r} to clone.")
        return form_page(request, session, forms.form_from_spec(job.spec), {}, clone_of=job)


# --- one job -------------------------------------------------------------------------------------------


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> HTMLResponse:
    parsed = parse_job_id(job_id)
    with open_session(request) as session:
        job = crud.get_job(session, parsed, details=True) if parsed else None
        if job is None:
            return error_page(request, 404, "Job not found", f"There is no job {job_id!r}. It may have been deleted.")
        progress = jobs.live_progress(request.app.state.redis, job)
        report, ran = report_of(job), ran_for(job)
        pview = progress_view(progress)
        if pview is not None and ran is not None:  # over: started -> finished, not the last event's clock
            pview["elapsed"] = fmt_duration(ran)
        return render(
            request,
            "job.html",
            {
                "job": job,
                "spec": spec_view(job.spec),
                "progress": progress,
                "pview": pview,
                "ran_for": ran,
                "whole_sparsity": whole_model_sparsity(report),
                "charts": job_charts(job, report),
                "metrics": job.metrics,
                "modules": job.modules,
                "report": report,
                "has_report": bool(job.result),
                "facts": facts(report, "page"),
                "zero_shot": job_rows(report.zero_shot),
                "active": job.status not in TERMINAL,
                "may_change": jobs.may_change(current_user(request), job),
                "spec_json": json.dumps(job.spec, indent=2),
                "artifact_ok": jobs.artifact_available(job, request.app.state.settings),
                "format_ratios": packagers.format_ratios(job.result),
                "extras": spec_extras(job.spec),
                "quantization_only": quantization_only(job.spec),
                "message": request.query_params.get("message", "")[:300],
                "waiting": jobs.waiting_note(request.app.state.redis, job, request.app.state.settings.queue),
            },
        )


# --- compare -------------------------------------------------------------------------------------------


def flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested spec as dotted keys and the text each value shows."""
    out: dict[str, str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, list):
            out[name] = ", ".join(map(str, value)) or "(none)"
        else:
            out[name] = "–" if value is None else str(value)
    return out


def _compare_ids(request: Request) -> list[int] | HTMLResponse:
    """The distinct job ids of ?ids=1,2&ids=3, sorted, or a 400 page."""
    ids: list[int] = []
    for value in request.query_params.getlist("ids"):
        for part in (p for p in value.split(",") if p.strip()):
            parsed = parse_job_id(part)
            if parsed is None:
                return error_page(
                    request, 400, "Bad job list", f"{part.strip()!r} is not a job id. Use /compare?ids=1,2,3."
                )
            if parsed not in ids:
                ids.append(parsed)
    if len(ids) > MAX_COMPARED:
        return error_page(request, 400, "Too many jobs", f"Compare at most {MAX_COMPARED} jobs at a time.")
    return sorted(ids)


def _comparison(jobs_: list[Job]) -> dict[str, Any]:
    """The spec side by side (over the defaults, so older jobs compare fairly), perplexities
    per set, and each job's error per block as one line."""
    flat = [flatten(spec_view(job.spec)) for job in jobs_]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    spec_rows = [
        {"key": k, "values": [f.get(k, "–") for f in flat], "differs": len({f.get(k, "–") for f in flat}) > 1}
        for k in keys
    ]
    datasets = list(dict.fromkeys(m.dataset for job in jobs_ for m in job.metrics))
    ppl = [
        {"dataset": d, "values": [next((m for m in job.metrics if m.dataset == d), None) for job in jobs_]}
        for d in datasets
    ]
    series = []
    for job in jobs_:
        blocks, _, errors = block_series(job)
        series.append((f"job {job.id}", [(b, e) for b, e in zip(blocks, errors) if e is not None]))
    chart = line_chart(series, title="Relative reconstruction error per block", x_label="block")
    return {
        "spec_rows": spec_rows,
        "ppl": ppl,
        "chart": chart,
        "differences": sum(r["differs"] for r in spec_rows),
        "accuracy": compare_rows([report_of(job) for job in jobs_]),
        "run_rows": run_rows(jobs_),
    }


def missing(job: Job) -> str:
    """What a job's cell shows for a value it does not have: failed or cancelled says so."""
    return job.status if job.status in ("failed", "cancelled") else "–"


def run_rows(jobs_: list[Job]) -> list[dict[str, Any]]:
    """Side by side: how long each job ran, its report's timings per step, peak memory, and the size
    of each artifact format it keeps (a failed job's cells say "failed")."""
    reports = [report_of(job) for job in jobs_]
    rows = [{"key": "ran for", "values": [fmt_duration(ran_for(job)) or missing(job) for job in jobs_]}]
    steps = list(dict.fromkeys(k for r in reports for k in r.seconds.to_json()))
    for step in steps:
        values = [r.seconds.to_json().get(step) for r in reports]
        rows.append(
            {
                "key": f"{step.replace('_', ' ')} (s)",
                "values": [
                    fmt_secs(v) if isinstance(v, (int, float)) else missing(job) for v, job in zip(values, jobs_)
                ],
            }
        )
    rows.append(
        {
            "key": "peak memory",
            "values": [
                fmt_bytes(r.peak_memory_bytes) if r.peak_memory_bytes else missing(job)
                for r, job in zip(reports, jobs_)
            ],
        }
    )
    formats = list(dict.fromkeys(a.format for job in jobs_ for a in job.artifacts if a.expired_at is None))
    for name in formats:
        sizes = [
            next((a.size for a in job.artifacts if a.format == name and a.expired_at is None), None) for job in jobs_
        ]
        rows.append(
            {
                "key": f"artifact {name}",
                "format": name,
                "values": [fmt_bytes(size) if size is not None else missing(job) for size, job in zip(sizes, jobs_)],
            }
        )
    if not formats:
        rows.append(
            {
                "key": "artifact",
                "values": [
                    fmt_bytes(job.artifact_size) if job.artifact_size and not job.artifact_expired_at else missing(job)
                    for job in jobs_
                ],
            }
        )
    return rows


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request) -> HTMLResponse:
    ids = _compare_ids(request)
    if isinstance(ids, HTMLResponse):
        return ids
    if len(ids) < 2:
        return render(request, "compare.html", {"jobs": [], "ids": ids, "need_more": True})
    with open_session(request) as session:
        found = []
        for job_id in ids:
            job = crud.get_job(session, job_id, details=True)
            if job is None:
                return error_page(request, 404, "Job not found", f"There is no job {job_id} to compare.")
            found.append(job)
        return render(request, "compare.html", {"jobs": found, "ids": ids, "need_more": False, **_comparison(found)})
