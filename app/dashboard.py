"""The browser dashboard: server-rendered Jinja2 pages (templates/) and static files (app/static/).

Pages: the jobs table (/), the new-job form (/jobs/new), a job (/jobs/{id}) and a comparison
(/compare?ids=1,2). The form validates with the API's own ``JobSpec`` and ``check_spec`` and
creates jobs through the same crud + enqueue path as ``POST /api/v1/jobs``. Live updates come
from the API (SSE and JSON) through a small script, app/static/dashboard.js.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from app import crud
from app.api.calibration import FORMATS, UploadError, _check_content, _safe_name
from app.api.jobs import create_for_user, live_progress, request_cancel
from app.models import STATUSES, SUCCEEDED, TERMINAL, CalibrationSet, Job
from app.schemas import BUILTIN_DATASETS, DTYPES, METHODS, JobSpec, upload_id
from app.validation import SpecError, check_spec

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
STATIC_DIR = Path(__file__).resolve().parent / "static"
templates = Jinja2Templates(directory=str(ROOT / "templates"))

router = APIRouter(include_in_schema=False)
PAGE_SIZE = 20
MULTIPART_OVERHEAD = 1024 * 1024


def install(app: FastAPI) -> None:
    """Register the dashboard's pages and its static files on the app."""
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    app.include_router(router)


# --- formatting helpers, available in every template --------------------------------------


def fmt_time(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def fmt_secs(seconds: float | None) -> str:
    """Short timings with decimals, long ones as a duration."""
    if seconds is None or not math.isfinite(seconds):
        return "–"
    return f"{seconds:.2f}s" if seconds < 60 else fmt_duration(seconds)


def fmt_bytes(size: int | float | None) -> str:
    if size is None:
        return ""
    size = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def fmt_ppl(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.2f}" if value < 1000 else f"{value:.4g}"


def progress_view(progress: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a progress bar shows: percent, stage, block i of n, module, ETA."""
    if not progress:
        return None
    fraction = progress.get("fraction")
    layer, layers = progress.get("layer"), progress.get("layers")
    return {
        "percent": round(100 * fraction, 1) if isinstance(fraction, (int, float)) else None,
        "stage": progress.get("stage") or "",
        "block": (f"block {layer + 1} of {layers}" if isinstance(layer, int) and isinstance(layers, int) else ""),
        "module": progress.get("module") or "",
        "eta": fmt_duration(progress.get("eta_s")),
        "elapsed": fmt_duration(progress.get("elapsed_s")),
        "message": progress.get("message") or "",
    }


templates.env.filters.update(secs=fmt_secs, time=fmt_time, duration=fmt_duration, bytes=fmt_bytes, ppl=fmt_ppl)
templates.env.globals.update(STATUSES=STATUSES, progress_view=progress_view)


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    context.setdefault("current_user", getattr(request.state, "user", None))
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def error_page(request: Request, status_code: int, title: str, message: str) -> HTMLResponse:
    return render(request, "error.html", {"title": title, "message": message, "code": status_code}, status_code)


def _session(request: Request) -> Session:
    return request.app.state.sessions()


def _user(request: Request):
    return getattr(request.state, "user", None)


def _may_change(request: Request, job: Job) -> bool:
    """Only the owner or an admin cancels or retries a job (everyone, in single-user mode)."""
    user = _user(request)
    return user is None or bool(getattr(user, "is_admin", False)) or job.owner_id == getattr(user, "id", None)


def _parse_job_id(raw: str) -> int | None:
    raw = raw.strip()
    if not raw.isdigit() or len(raw) > 10:
        return None
    value = int(raw)
    return value if 1 <= value <= 2**31 - 1 else None


# --- queries of the dashboard's own --------------------------------------------------------


def _jobs_page(session: Session, status: str | None, page: int) -> tuple[list[Job], int]:
    query = select(Job).options(selectinload(Job.metrics)).order_by(Job.id.desc())
    count = select(func.count()).select_from(Job)
    if status:
        query, count = query.where(Job.status == status), count.where(Job.status == status)
    items = session.scalars(query.limit(PAGE_SIZE).offset((page - 1) * PAGE_SIZE)).unique().all()
    return list(items), session.scalar(count) or 0


def _status_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {status: n for status, n in rows}


def _disk(session: Session, data_dir: Path) -> dict[str, Any]:
    artifacts = session.execute(
        select(func.count(), func.coalesce(func.sum(Job.artifact_size), 0)).where(
            Job.artifact_path.is_not(None), Job.status == SUCCEEDED
        )
    ).one()
    try:
        usage = shutil.disk_usage(data_dir)
        free, total = usage.free, usage.total
    except OSError:
        free = total = None
    return {"artifacts": int(artifacts[0]), "artifact_bytes": int(artifacts[1]), "free": free, "total": total}


def _job_details(session: Session, job_id: int) -> Job | None:
    return crud.get_job(session, job_id, details=True)


# --- the jobs table -----------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def jobs_page(request: Request, status: str = "", page: str = "1") -> HTMLResponse:
    settings = request.app.state.settings
    status = status.strip()
    if status and status not in STATUSES:
        return error_page(request, 400, "Unknown status", f"{status!r} is not a job status; use one of {', '.join(STATUSES)}.")
    page_no = int(page) if page.strip().isdigit() and 0 < int(page) < 10**6 else 1
    with _session(request) as session:
        jobs, total = _jobs_page(session, status or None, page_no)
        counts = _status_counts(session)
        disk = _disk(session, settings.data_dir)
        r = request.app.state.redis
        rows = [{"job": job, "progress": progress_view(live_progress(r, job)),
                 "metric": job.metrics[0] if job.metrics else None} for job in jobs]
    pages = max(1, math.ceil(total / PAGE_SIZE))
    return render(request, "jobs.html", {
        "rows": rows, "total": total, "status": status, "page": page_no, "pages": pages,
        "counts": counts, "all_count": sum(counts.values()), "disk": disk, "page_size": PAGE_SIZE,
    })


# --- the new-job form -----------------------------------------------------------------------------

FORM_DEFAULTS: dict[str, Any] = {
    "model": "", "revision": "", "trust_remote_code": False, "method": "sparsegpt", "sparsity": "0.5",
    "calibration_source": "c4", "calibration_upload": "", "calibration_path": "",
    "nsamples": "128", "seqlen": "", "seed": "0",
    "blocksize": "128", "percdamp": "0.01", "wbits": "", "exact": False,
    "eval_sets": ["wikitext2"], "eval_extra": "", "max_windows": "", "dense": True, "dtype": "auto",
}

# Where an error of the spec (its pydantic location) is shown in the form.
_FIELD_OF_LOC = {
    ("model",): "model", ("revision",): "revision", ("trust_remote_code",): "trust_remote_code",
    ("method",): "method", ("sparsity",): "sparsity", ("dtype",): "dtype",
    ("calibration", "dataset"): "calibration_source", ("calibration", "nsamples"): "nsamples",
    ("calibration", "seqlen"): "seqlen", ("calibration", "seed"): "seed",
    ("solver", "blocksize"): "blocksize", ("solver", "percdamp"): "percdamp", ("solver", "wbits"): "wbits",
    ("solver", "exact"): "exact",
    ("evaluation", "datasets"): "eval_sets", ("evaluation", "max_windows"): "max_windows",
    ("evaluation", "dense"): "dense",
}


def form_from_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The form's values for a stored spec (Clone)."""
    form = dict(FORM_DEFAULTS)
    cal, ev, solver = spec.get("calibration", {}), spec.get("evaluation", {}), spec.get("solver", {})
    sparsity = spec.get("sparsity", "")
    form.update(
        model=spec.get("model", ""), revision=spec.get("revision") or "",
        trust_remote_code=bool(spec.get("trust_remote_code")), method=spec.get("method", "sparsegpt"),
        sparsity=sparsity if isinstance(sparsity, str) else f"{sparsity:g}",
        nsamples=str(cal.get("nsamples", 128)), seqlen="" if cal.get("seqlen") is None else str(cal["seqlen"]),
        seed=str(cal.get("seed", 0)), blocksize=str(solver.get("blocksize", 128)),
        percdamp=f"{solver.get('percdamp', 0.01):g}", wbits="" if solver.get("wbits") is None else str(solver["wbits"]),
        exact=bool(solver.get("exact", False)),
        max_windows="" if ev.get("max_windows") is None else str(ev["max_windows"]),
        dense=bool(ev.get("dense", True)), dtype=spec.get("dtype", "auto"),
    )
    dataset = cal.get("dataset", "c4")
    if dataset in BUILTIN_DATASETS:
        form["calibration_source"] = dataset
    elif upload_id(dataset) is not None:
        form.update(calibration_source="upload", calibration_upload=dataset)
    else:
        form.update(calibration_source="path", calibration_path=dataset)
    sets = ev.get("datasets", ["wikitext2"])
    form["eval_sets"] = [s for s in sets if s in BUILTIN_DATASETS]
    form["eval_extra"] = ", ".join(s for s in sets if s not in BUILTIN_DATASETS)
    return form


def _text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def form_values(form: FormData) -> dict[str, Any]:
    """The submitted values, as the form shows them again."""
    values = {name: _text(form, name) for name, default in FORM_DEFAULTS.items() if isinstance(default, str)}
    values["trust_remote_code"] = form.get("trust_remote_code") is not None
    values["dense"] = form.get("dense") is not None
    values["exact"] = form.get("exact") is not None
    values["eval_sets"] = [v for v in form.getlist("eval_sets") if isinstance(v, str)]
    return values


def spec_body(values: dict[str, Any]) -> dict[str, Any]:
    """The JSON body POST /api/v1/jobs would take; empty optional fields are left to their defaults."""
    source = values["calibration_source"]
    if source == "upload":
        dataset = values["calibration_upload"]
    elif source == "path":
        dataset = values["calibration_path"]
    else:
        dataset = source
    extra = [s.strip() for s in values["eval_extra"].replace("\n", ",").split(",") if s.strip()]
    calibration: dict[str, Any] = {"dataset": dataset, "nsamples": values["nsamples"], "seed": values["seed"]}
    if values["seqlen"]:
        calibration["seqlen"] = values["seqlen"]
    solver: dict[str, Any] = {"blocksize": values["blocksize"], "percdamp": values["percdamp"]}
    if values["wbits"]:
        solver["wbits"] = values["wbits"]
    if values["exact"]:
        solver["exact"] = True
    evaluation: dict[str, Any] = {"datasets": [*values["eval_sets"], *extra], "dense": values["dense"]}
    if values["max_windows"]:
        evaluation["max_windows"] = values["max_windows"]
    body: dict[str, Any] = {
        "model": values["model"], "method": values["method"], "sparsity": values["sparsity"],
        "trust_remote_code": values["trust_remote_code"], "dtype": values["dtype"],
        "calibration": calibration, "solver": solver, "evaluation": evaluation,
    }
    if values["revision"]:
        body["revision"] = values["revision"]
    return body


def _clean_msg(msg: str) -> str:
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


_PLAIN = {
    "greater_than_equal": "must be at least {ge}", "greater_than": "must be more than {gt}",
    "less_than_equal": "must be at most {le}", "less_than": "must be less than {lt}",
    "int_parsing": "must be a whole number", "int_from_float": "must be a whole number",
    "float_parsing": "must be a number", "missing": "is required",
    "string_too_short": "is required", "string_too_long": "is too long (at most {max_length} characters)",
    "literal_error": "must be one of {expected}",
}


def _message(error: dict[str, Any]) -> str:
    """A pydantic error in plain words (the spec's own messages are kept as they are)."""
    template = _PLAIN.get(str(error.get("type")))
    if template:
        try:
            text = template.format(**(error.get("ctx") or {}))
        except (KeyError, IndexError):
            return _clean_msg(str(error.get("msg", "invalid")))
        text = text[0].upper() + text[1:]
        raw = error.get("input")
        if isinstance(raw, (str, int, float)) and not isinstance(raw, bool) and str(raw).strip():
            text += f" (got {str(raw)[:60]})"
        return text
    return _clean_msg(str(error.get("msg", "invalid")))


def field_errors(errors: list[dict[str, Any]]) -> dict[str, list[str]]:
    """pydantic / SpecError entries -> {form field: [messages]} ("" for the form as a whole)."""
    out: dict[str, list[str]] = {}
    for error in errors:
        loc = tuple(p for p in error.get("loc", ()) if p != "body")
        msg = _message(error)
        field = None
        for size in range(len(loc), 0, -1):
            key = tuple(p for p in loc[:size] if isinstance(p, str))
            if key in _FIELD_OF_LOC:
                field = _FIELD_OF_LOC[key]
                break
        if field is None and not loc:  # a check across fields (model validator)
            field = next((f for f in ("wbits", "exact", "blocksize") if f in msg), "")
        out.setdefault(field or "", []).append(msg)
    return out


async def _save_upload(file: UploadFile, settings, session: Session, owner_id: int | None) -> CalibrationSet:
    """A calibration file from the form, stored as the API stores uploads (content-addressed)."""
    suffix = Path(file.filename or "").suffix.lower()
    if suffix not in FORMATS:
        raise UploadError(422, f"{file.filename or 'the file'!r}: calibration sets are .txt (plain text) or .jsonl (one {{\"text\": ...}} per line)")
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=settings.uploads_dir, prefix=".upload-", suffix=suffix)
    sha, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as handle:
            while chunk := await file.read(1024 * 1024):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise UploadError(413, f"the file is larger than this server's upload limit of {fmt_bytes(settings.max_upload_bytes)}")
                sha.update(chunk)
                handle.write(chunk)
        fmt = FORMATS[suffix]
        await run_in_threadpool(_check_content, Path(tmp), fmt)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    digest = sha.hexdigest()
    final = settings.uploads_dir / f"{digest}.{fmt}"
    os.replace(tmp, final)
    row = crud.create_calibration_set(
        session, name=_safe_name(file.filename or "upload"), format=fmt, size=size, sha256=digest, path=str(final),
        owner_id=owner_id,
    )
    session.commit()
    return row


def _form_context(session: Session, values: dict[str, Any], errors: dict[str, list[str]], **extra) -> dict[str, Any]:
    uploads = crud.list_calibration_sets(session, limit=100)
    return {
        "form": values, "errors": errors, "uploads": uploads, "methods": METHODS, "dtypes": DTYPES,
        "builtin": BUILTIN_DATASETS, **extra,
    }


@router.get("/jobs/new", response_class=HTMLResponse)
def new_job_page(request: Request, clone: str = "") -> HTMLResponse:
    values, source = dict(FORM_DEFAULTS), None
    with _session(request) as session:
        if clone:
            job_id = _parse_job_id(clone)
            job = crud.get_job(session, job_id) if job_id else None
            if job is None:
                return error_page(request, 404, "Job not found", f"There is no job {clone!r} to clone.")
            values, source = form_from_spec(job.spec), job
        return render(request, "new_job.html", _form_context(session, values, {}, clone_of=source))


@router.post("/jobs/new", response_class=HTMLResponse)
async def submit_job_form(request: Request):
    settings = request.app.state.settings
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_upload_bytes + MULTIPART_OVERHEAD:
        return error_page(request, 413, "Upload too large",
                          f"The form is larger than this server's upload limit of {fmt_bytes(settings.max_upload_bytes)}. "
                          "Go back and choose a smaller calibration file.")
    try:
        form = await request.form(max_files=2, max_fields=100)
    except Exception as err:  # malformed multipart, too many parts
        return error_page(request, 400, "Malformed form", f"The form could not be read: {err}")
    values = form_values(form)
    errors: dict[str, list[str]] = {}
    notice = ""
    session = _session(request)
    try:
        if values["calibration_source"] == "file":
            file = form.get("calibration_file")
            if not isinstance(file, UploadFile) or not file.filename:
                errors["calibration_source"] = ["choose a .txt or .jsonl file to upload"]
            else:
                try:
                    row = await _save_upload(file, settings, session, getattr(_user(request), "id", None))
                except UploadError as err:
                    errors["calibration_source"] = [err.detail]
                else:  # kept: the form now names the stored upload
                    values.update(calibration_source="upload", calibration_upload=f"upload:{row.id}")
                    notice = f"{row.name} was uploaded as upload:{row.id}."
        elif values["calibration_source"] not in (*BUILTIN_DATASETS, "upload", "path"):
            errors["calibration_source"] = ["choose where the calibration text comes from"]
        elif values["calibration_source"] == "upload" and not values["calibration_upload"]:
            errors["calibration_source"] = ["choose one of the uploaded files"]
        source_errors, errors = errors, {}
        try:  # every field's errors at once; the calibration choice's own message wins
            spec = JobSpec.model_validate(spec_body(values))
        except ValidationError as err:
            errors = field_errors(err.errors())
        errors.update(source_errors)
        if not errors:
            try:
                data = check_spec(spec, settings, session)
            except SpecError as err:
                errors = field_errors(err.errors)
        if errors:
            context = _form_context(session, values, errors, notice=notice)
            return render(request, "new_job.html", context, status_code=422)
        try:  # the API's path: per-user cap (429) and the queue (503) answer with a reason
            job_id = create_for_user(session, settings, _user(request), data).id
        except HTTPException as err:
            context = _form_context(session, values, {}, notice=str(err.detail))
            return render(request, "new_job.html", context, status_code=err.status_code)
    finally:
        session.close()
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


# --- one job ----------------------------------------------------------------------------------------


def spec_view(spec: dict[str, Any]) -> dict[str, Any]:
    """The stored spec over the schema's defaults, so that every field has a value to show."""
    merged = JobSpec(model="org/model", sparsity=0.5).model_dump(mode="json")
    for key, value in (spec or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _block_series(job: Job) -> tuple[list[int], list[float | None], list[float | None]]:
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


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> HTMLResponse:
    parsed = _parse_job_id(job_id)
    with _session(request) as session:
        job = _job_details(session, parsed) if parsed else None
        if job is None:
            return error_page(request, 404, "Job not found", f"There is no job {job_id!r}. It may have been deleted.")
        progress = live_progress(request.app.state.redis, job)
        blocks, sparsity, errors = _block_series(job)
        charts_svg = {}
        if blocks:
            labels = [str(b) for b in blocks]
            charts_svg["sparsity"] = bar_chart(
                labels, [100 * s for s in sparsity], title="Achieved sparsity per block (%)", y_max=100,
                value_format="{:.1f}%", css="bar-sparsity")
            charts_svg["error"] = bar_chart(
                labels, errors, title="Relative reconstruction error per block (mean of its modules)",
                value_format="{:.3g}", css="bar-error")
        result = job.result or {}
        seconds = result.get("seconds") or {}
        context = {
            "job": job, "spec": spec_view(job.spec), "progress": progress, "pview": progress_view(progress), "charts": charts_svg,
            "metrics": job.metrics, "modules": job.modules, "result": result, "seconds": seconds,
            "environment": result.get("environment") or {}, "active": job.status not in TERMINAL,
            "may_change": _may_change(request, job), "spec_json": json.dumps(job.spec, indent=2),
            "artifact_ok": job.status == SUCCEEDED and bool(job.artifact_sha256) and job.artifact_size is not None
            and bool(job.artifact_path) and getattr(job, "artifact_expired_at", None) is None
            and Path(job.artifact_path).is_dir(),
            "message": request.query_params.get("message", "")[:300],
        }
        return render(request, "job.html", context)


def _job_to_change(request: Request, session: Session, job_id: str, verb: str):
    """(job, None) when the signed-in user may ``verb`` it, else (None, a 404 or 403 page)."""
    parsed = _parse_job_id(job_id)
    job = crud.get_job(session, parsed) if parsed else None
    if job is None:
        return None, error_page(request, 404, "Job not found", f"There is no job {job_id!r}.")
    if not _may_change(request, job):
        return None, error_page(request, 403, "Not yours", f"Only the owner of job {job.id} or an admin may {verb} it.")
    return job, None


@router.post("/jobs/{job_id}/cancel")
def cancel_job_form(request: Request, job_id: str):
    settings = request.app.state.settings
    with _session(request) as session:
        job, refusal = _job_to_change(request, session, job_id, "cancel")
        if refusal is not None:
            return refusal
        outcome = request_cancel(session, settings, request.app.state.redis, job.id)
        message = {
            "cancelled": "Cancelled before it started.",
            "requested": "Cancel requested: the job stops after the module it is working on.",
            "finished": f"The job had already ended ({outcome.job.status if outcome.job else ''}).",
        }.get(outcome.outcome, "")
    return RedirectResponse(f"/jobs/{job.id}?message={message}", status_code=303)


@router.post("/jobs/{job_id}/retry")
def retry_job_form(request: Request, job_id: str):
    """A new job with the same spec, queued now (checked again: an upload may be gone)."""
    settings = request.app.state.settings
    with _session(request) as session:
        job, refusal = _job_to_change(request, session, job_id, "retry")
        if refusal is not None:
            return refusal
        try:
            data = check_spec(JobSpec.model_validate(job.spec), settings, session)
        except (ValidationError, SpecError) as err:
            problems = err.errors() if isinstance(err, ValidationError) else err.errors
            text = "; ".join(_clean_msg(str(e.get("msg"))) for e in problems)
            return error_page(request, 422, "Cannot retry",
                              f"Job {job.id}'s spec is no longer accepted: {text}. Use Clone to edit it.")
        try:
            new_id = create_for_user(session, settings, _user(request), data, retry_of=job.id).id
        except HTTPException as err:
            return error_page(request, err.status_code, "Cannot retry", str(err.detail))
    return RedirectResponse(f"/jobs/{new_id}?message=A retry of job {job.id}.", status_code=303)


# --- compare -------------------------------------------------------------------------------------------


def flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, str]:
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


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request) -> HTMLResponse:
    raw = [part for value in request.query_params.getlist("ids") for part in value.split(",") if part.strip()]
    ids: list[int] = []
    for part in raw:
        parsed = _parse_job_id(part)
        if parsed is None:
            return error_page(request, 400, "Bad job list", f"{part.strip()!r} is not a job id. Use /compare?ids=1,2,3.")
        if parsed not in ids:
            ids.append(parsed)
    ids.sort()
    if len(ids) > 12:
        return error_page(request, 400, "Too many jobs", "Compare at most 12 jobs at a time.")
    if len(ids) < 2:
        return render(request, "compare.html", {"jobs": [], "ids": ids, "need_more": True}, 200)
    with _session(request) as session:
        jobs = []
        for job_id in ids:
            job = _job_details(session, job_id)
            if job is None:
                return error_page(request, 404, "Job not found", f"There is no job {job_id} to compare.")
            jobs.append(job)
        flat = [flatten(job.spec) for job in jobs]
        keys = list(dict.fromkeys(k for f in flat for k in f))
        spec_rows = [{"key": k, "values": [f.get(k, "–") for f in flat],
                      "differs": len({f.get(k, "–") for f in flat}) > 1} for k in keys]
        datasets = list(dict.fromkeys(m.dataset for job in jobs for m in job.metrics))
        ppl = [{"dataset": d, "values": [next((m for m in job.metrics if m.dataset == d), None) for job in jobs]}
               for d in datasets]
        series = []
        for job in jobs:
            blocks, _, errors = _block_series(job)
            series.append((f"job {job.id}", [(b, e) for b, e in zip(blocks, errors) if e is not None]))
        chart = line_chart(series, title="Relative reconstruction error per block", x_label="block")
        return render(request, "compare.html", {
            "jobs": jobs, "ids": ids, "spec_rows": spec_rows, "ppl": ppl, "chart": chart, "need_more": False,
            "differences": sum(r["differs"] for r in spec_rows),
        })


# --- charts: SVG drawn here, styled by app/static/dashboard.css --------------------------------------

PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")
_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 640, 240, 56, 16, 28, 36


def _nice_max(value: float) -> float:
    if value <= 0 or not math.isfinite(value):
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent:
            return step * exponent
    return 10 * exponent


def _tick(value: float) -> str:
    return f"{value:.3g}"


def _frame(title: str, y_max: float, x_label: str = "block") -> list[str]:
    plot_h = _H - _TOP - _BOTTOM
    parts = [
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text class="chart-title" x="{_LEFT}" y="16">{escape(title)}</text>',
    ]
    for i in range(5):
        y = _TOP + plot_h - plot_h * i / 4
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick(y_max * i / 4)}</text>')
    parts.append(f'<text class="axis-label" x="{(_LEFT + _W - _RIGHT) / 2:.0f}" y="{_H - 4}" text-anchor="middle">{escape(x_label)}</text>')
    return parts


def bar_chart(labels: list[str], values: list[float | None], *, title: str, y_max: float | None = None,
              value_format: str = "{:.3g}", css: str = "bar") -> Markup:
    """One bar per label (a block); missing values are left empty."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = y_max if y_max is not None else _nice_max(max(finite, default=0.0))
    parts = _frame(title, top)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    slot = plot_w / max(1, len(labels))
    width = max(2.0, slot * 0.7)
    for i, (label, value) in enumerate(zip(labels, values)):
        x = _LEFT + slot * i + (slot - width) / 2
        if len(labels) <= 32 or i % math.ceil(len(labels) / 32) == 0:
            parts.append(f'<text class="tick" x="{x + width / 2:.1f}" y="{_TOP + plot_h + 14}" text-anchor="middle">{escape(label)}</text>')
        if value is None or not math.isfinite(value):
            continue
        height = plot_h * min(value, top) / top if top else 0
        y = _TOP + plot_h - height
        shown = value_format.format(value)
        parts.append(
            f'<rect class="{css}" x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{max(height, 0.5):.1f}">'
            f'<title>block {escape(label)}: {escape(shown)}</title></rect>'
        )
        if len(labels) <= 16:
            parts.append(f'<text class="bar-value" x="{x + width / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle">{escape(shown)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def line_chart(series: list[tuple[str, list[tuple[int, float]]]], *, title: str, x_label: str) -> Markup:
    """One polyline (with points) per series over integer x (blocks), and a legend."""
    xs = [x for _, points in series for x, _ in points]
    ys = [y for _, points in series for _, y in points if math.isfinite(y)]
    top = _nice_max(max(ys, default=0.0))
    parts = _frame(title, top, x_label)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    lo, hi = (min(xs), max(xs)) if xs else (0, 1)
    span = max(1, hi - lo)

    pad = 18.0

    def px(x: int) -> float:
        return _LEFT + pad + (plot_w - 2 * pad) * ((x - lo) / span if hi > lo else 0.5)

    def py(y: float) -> float:
        return _TOP + plot_h - plot_h * min(y, top) / top

    for x in range(lo, hi + 1) if xs and hi - lo <= 40 else []:
        parts.append(f'<text class="tick" x="{px(x):.1f}" y="{_TOP + plot_h + 14}" text-anchor="middle">{x}</text>')
    for index, (name, points) in enumerate(series):
        color = PALETTE[index % len(PALETTE)]
        points = [(x, y) for x, y in points if math.isfinite(y)]
        if len(points) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
            parts.append(f'<polyline class="series" data-series="{escape(name)}" points="{path}" stroke="{color}"/>')
        for x, y in points:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}"><title>{escape(name)}, block {x}: {y:.4g}</title></circle>')
        legend_x = _W - _RIGHT - 120 * (len(series) - index)
        parts.append(f'<rect x="{legend_x}" y="8" width="12" height="4" fill="{color}"/>')
        label = name if points else f"{name} (none)"
        parts.append(f'<text class="legend" x="{legend_x + 16}" y="14">{escape(label)}</text>')
    if not ys:
        parts.append(f'<text class="empty" x="{_W / 2}" y="{_H / 2}" text-anchor="middle">no per-block results yet</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
