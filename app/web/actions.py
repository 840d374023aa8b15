"""What the dashboard's forms post: a new job (/jobs/new), cancel and retry (/jobs/{id}/...).

Each checks the form's CSRF token (``app.web.csrf``: 403 without the right one), parses the
form, calls the service the API calls (``app.services``: the same checks, caps and queue), and
renders the form again with its errors or redirects (303) to the job's page.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.services import jobs, plans, upload_store, uploads
from app.services.specs import SpecError
from app.web import csrf, forms
from app.web.pages import form_page
from app.web.render import csrf_refused, current_user, error_page, open_session, parse_job_id
from worker.engine.contract.spec import JobSpec

router = APIRouter(include_in_schema=False)

# A body the upload path refuses before the form can be read: its page title, by status.
_REFUSED = {400: "Malformed form", 413: "Upload too large", 415: "Not a form", 422: "File refused"}


# --- a new job -----------------------------------------------------------------------------------


def _refused(request: Request, err: uploads.UploadError) -> HTMLResponse:
    advice = {
        413: "Go back and choose a smaller calibration file.",
        422: "Go back and choose a .txt or .jsonl file.",
    }.get(err.status_code, "Go back and try again.")
    return error_page(
        request,
        err.status_code,
        _REFUSED.get(err.status_code, "The form was refused"),
        f"The form could not be read: {err.detail}. {advice}",
    )


async def _take_file(
    request: Request, session: Session, values: dict[str, Any], file: uploads.ReceivedFile | None
) -> tuple[dict[str, list[str]], str]:
    """Store the uploaded calibration file when the form chose "upload a new file" (discard it
    otherwise); then the form names the stored upload. Returns (errors, notice)."""
    if values["calibration_source"] != "file":
        if file is not None:
            file.discard()
        return forms.calibration_choice_errors(values), ""
    if file is None:
        return {"calibration_source": ["choose a .txt or .jsonl file to upload"]}, ""
    try:
        row = await upload_store.store(session, request.app.state.settings, file, owner_id=current_user(request).id)
    except uploads.UploadError as err:
        return {"calibration_source": [str(err.detail)]}, ""
    values.update(calibration_source="upload", calibration_upload=f"upload:{row.id}")  # kept for the next try
    return {}, f"{row.name} was uploaded as upload:{row.id}."


def _create(
    request: Request, session: Session, values: dict[str, Any], errors: dict[str, list[str]], notice: str
) -> Response:
    """Validate the form as the spec, then create through ``jobs.create`` (the server's checks,
    the per-user cap, the queue); the form again with what went wrong, or the job's page."""
    try:  # every field's errors at once; the calibration choice's own message wins
        spec = JobSpec.model_validate(forms.spec_body(values))
    except ValidationError as err:
        errors = {**forms.field_errors(err.errors()), **errors}
    if errors:
        return form_page(request, session, values, errors, status_code=422, notice=notice)
    try:
        job = jobs.create(session, request.app.state.settings, current_user(request), spec).job
    except SpecError as err:
        return form_page(request, session, values, forms.field_errors(err.errors), status_code=422, notice=notice)
    except HTTPException as err:  # the per-user cap (429), the queue (503): the reason as the notice
        return form_page(request, session, values, {}, status_code=err.status_code, notice=str(err.detail))
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.post("/jobs/new", response_class=HTMLResponse)
async def submit_job_form(request: Request) -> Response:
    if not csrf.can_pass(request):  # no token could be right: refused before the body is read
        return csrf_refused(request)
    # The body is parsed as it streams, under the server's upload cap (uploads.receive).
    try:
        received = await uploads.receive(request, request.app.state.settings, file_field="calibration_file", form=True)
    except uploads.UploadError as err:
        return _refused(request, err)
    if not csrf.valid(request, received.get(csrf.FIELD)):  # before anything is stored
        if received.file is not None:
            received.file.discard()
        return csrf_refused(request)
    values = forms.form_values(received.fields)
    with open_session(request) as session:
        try:
            errors, notice = await _take_file(request, session, values, received.file)
        except BaseException:
            if received.file is not None:
                received.file.discard()
            raise
        # The rest is blocking (database, queue): off the event loop, like the API's routes.
        return await run_in_threadpool(_create, request, session, values, errors, notice)


# --- cancel and retry ------------------------------------------------------------------------------


_CANCELLED = {
    "cancelled": "Cancelled before it started.",
    "requested": "Cancel requested: the job stops after the module it is working on.",
}


@router.post("/jobs/{job_id}/cancel")
def cancel_job_form(request: Request, job_id: str, csrf_token: Annotated[str, Form(max_length=256)] = "") -> Response:
    parsed = _job_form(request, job_id, csrf_token)
    if isinstance(parsed, Response):
        return parsed
    with open_session(request) as session:
        try:
            outcome = jobs.cancel(
                session, request.app.state.settings, request.app.state.redis, current_user(request), parsed
            )
        except HTTPException as err:  # 404, 403 (not yours)
            return _refusal(request, err, "Cannot cancel")
        if outcome.outcome == "finished":
            message = f"The job had already ended ({outcome.job.status if outcome.job else ''})."
        else:
            message = _CANCELLED.get(outcome.outcome, "")
            plans.job_changed(session, request.app.state.settings, outcome.job.plan_id if outcome.job else None)
    return RedirectResponse(f"/jobs/{parsed}?message={message}", status_code=303)


def _job_form(request: Request, job_id: str, csrf_token: str) -> int | Response:
    """A job's button form: its id, or the page refusing it (no valid CSRF token: 403; no such id: 404)."""
    if not csrf.valid(request, csrf_token):
        return csrf_refused(request)
    parsed = parse_job_id(job_id)
    if parsed is None:
        return error_page(request, 404, "Job not found", f"There is no job {job_id!r}.")
    return parsed


def _refusal(request: Request, err: HTTPException, title: str) -> HTMLResponse:
    """The service's refusal as a page, titled by its status."""
    title = {404: "Job not found", 403: "Not yours"}.get(err.status_code, title)
    return error_page(request, err.status_code, title, str(err.detail))


@router.post("/jobs/{job_id}/retry")
def retry_job_form(request: Request, job_id: str, csrf_token: Annotated[str, Form(max_length=256)] = "") -> Response:
    """A new job with the same spec, queued now (checked again: an upload may be gone)."""
    parsed = _job_form(request, job_id, csrf_token)
    if isinstance(parsed, Response):
        return parsed
    with open_session(request) as session:
        try:
            new = jobs.retry(session, request.app.state.settings, current_user(request), parsed)
        except SpecError as err:
            text = "; ".join(forms.describe(e) for e in err.errors)
            return error_page(
                request,
                422,
                "Cannot retry",
                f"Job {parsed}'s spec is no longer accepted: {text}. Use Clone to edit it.",
            )
        except HTTPException as err:  # 404, 403 (not yours), 409 (not finished), 429, 503
            return _refusal(request, err, "Cannot retry")
        new_id = new.id
        plans.job_changed(session, request.app.state.settings, new.plan_id)
    return RedirectResponse(f"/jobs/{new_id}?message=A retry of job {parsed}.", status_code=303)
