"""The dashboard's compression plans: the list (/plans), the "New plan" form (/plans/new, posted
to POST /plans), a plan's page (/plans/{id}: chart, table, recommendation) and its Cancel button
(POST /plans/{id}/cancel).

Each route reads or changes plans through ``app.services.plans``, the path the API takes (the
same checks, caps and queue); forms carry the CSRF token (``app.web.csrf``). The plan page embeds
the plan's JSON (the API's ``GET /api/v1/plans/{id}``) as data for app/static/plan.js, which draws
the chart with the vendored Chart.js: the plan pages send a Content-Security-Policy that lets only
this server's own script files run.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import crud
from app.plan_schemas import PlanIn
from app.services import plans
from app.services.specs import SpecError
from app.web import csrf, forms, plan_forms
from app.web.pages import unavailable_sets
from app.web.plan_view import HELPERS as FMT
from app.web.plan_view import PLAN_CSP, budget_text, page_context, recommended_point
from app.web.render import csrf_refused, current_user, error_page, open_session, parse_job_id, render
from worker.engine.contract.spec import METHODS
from worker.engine.contract.spec_sections import BUILTIN_DATASETS

router = APIRouter(include_in_schema=False)
PAGE_SIZE = 20
MAX_FORM_FIELDS = 200  # the form has about 60 inputs; a body with more is not this form


def _strict(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = PLAN_CSP
    return response


# --- the list ------------------------------------------------------------------------------------


@router.get("/plans", response_class=HTMLResponse)
def plans_page(request: Request, page: str = "1") -> HTMLResponse:
    """The user's plans, newest first (an admin's: everyone's)."""
    page_no = int(page) if page.strip().isdigit() and 0 < int(page) < 10**6 else 1
    user = current_user(request)
    everyone = user is not None and user.is_admin
    offset = (page_no - 1) * PAGE_SIZE
    with open_session(request) as session:
        if everyone:
            items, total = crud.list_plans(session, owner_id=None, limit=PAGE_SIZE, offset=offset)
        else:
            items, total = plans.list_plans(session, user, limit=PAGE_SIZE, offset=offset)
        views = [plans.plan_json(session, plan) for plan in items]
        rows = [{"plan": view, "chosen": recommended_point(view), "budget": budget_text(view)} for view in views]
        context = {
            "rows": rows,
            "total": total,
            "page": page_no,
            "pages": max(1, math.ceil(total / PAGE_SIZE)),
            "everyone": everyone,
            "fmt": FMT,
        }
        return _strict(render(request, "plans.html", context))


# --- the form ------------------------------------------------------------------------------------


def _form_page(
    request: Request, session: Session, values: dict[str, Any], errors: dict[str, list[str]], status_code: int = 200
) -> Response:
    context = {
        "form": values,
        "errors": errors,
        "helps": plan_forms.HELP,
        "uploads": crud.list_calibration_sets(session, limit=100),
        "builtin": BUILTIN_DATASETS,
        "unavailable": unavailable_sets(),
        "allowed_dirs": [str(d) for d in request.app.state.settings.allowed_dirs],
        "dtypes": forms.CHOICES.get("dtype", ("auto",)),
        "methods": METHODS,
        "schemes": plan_forms.SCHEMES,
        "refits": plan_forms.REFITS,
        "sparsity_choices": plan_forms.SPARSITIES,
    }
    return _strict(render(request, "new_plan.html", context, status_code=status_code))


@router.get("/plans/new", response_class=HTMLResponse)
def new_plan_page(request: Request) -> Response:
    with open_session(request) as session:
        values = dict(plan_forms.DEFAULTS)
        unavailable = unavailable_sets()
        if values["calibration_source"] in unavailable:  # no set this server cannot load is picked for the user
            values["calibration_source"] = "path"
        values["eval_sets"] = [d for d in values["eval_sets"] if d not in unavailable]
        return _form_page(request, session, values, {})


def _create(request: Request, values: dict[str, Any]) -> Response:
    """Validate the form as the API's body, then create through ``plans.create`` (every point
    checked before anything is queued, the caps, the queue); the form again with what went
    wrong, or the plan's page."""
    with open_session(request) as session:
        errors = plan_forms.choice_errors(values)
        body = None
        try:
            body = PlanIn.model_validate(plan_forms.body_of(values))
        except ValidationError as err:
            errors = {**plan_forms.field_errors(err.errors()), **errors}
        if errors or body is None:
            return _form_page(request, session, values, errors, status_code=422)
        try:
            plan = plans.create(session, request.app.state.settings, current_user(request), body)
        except SpecError as err:  # settings the model cannot take: every one named
            return _form_page(request, session, values, plan_forms.field_errors(err.errors), status_code=422)
        except HTTPException as err:  # the caps (422, 429), the queue (503): the reason as the page's error
            detail = err.detail if isinstance(err.detail, str) else "; ".join(map(str, err.detail))
            return _form_page(request, session, values, {"": [detail]}, status_code=err.status_code)
        plan_id = plan.id
    return RedirectResponse(f"/plans/{plan_id}", status_code=303)


@router.post("/plans", response_class=HTMLResponse)
async def submit_plan_form(request: Request) -> Response:
    if not csrf.can_pass(request):  # no token could be right: refused before the body is read
        return csrf_refused(request)
    try:
        form = await request.form(max_files=0, max_fields=MAX_FORM_FIELDS)
    except Exception as err:  # noqa: BLE001 - a malformed or oversized body: a 400 page, never a 500
        return error_page(request, 400, "Malformed form", f"The form could not be read ({err}). Go back and try again.")
    fields = {key: [v for v in form.getlist(key) if isinstance(v, str)] for key in form.keys()}
    if not csrf.valid(request, (fields.get(csrf.FIELD) or [""])[0]):
        return csrf_refused(request)
    return await run_in_threadpool(_create, request, plan_forms.values_of(fields))


# --- one plan ------------------------------------------------------------------------------------


@router.get("/plans/{plan_id}", response_class=HTMLResponse)
def plan_page(request: Request, plan_id: str) -> Response:
    parsed = parse_job_id(plan_id)
    with open_session(request) as session:
        plan = crud.get_plan(session, parsed) if parsed else None
        if plan is None:
            return error_page(
                request, 404, "Plan not found", f"There is no plan {plan_id!r}. It may have been deleted."
            )
        user = current_user(request)
        context = {
            **page_context(plans.plan_json(session, plan)),
            "may_change": user is None or user.may_manage(plan.owner_id),
            "message": request.query_params.get("message", "")[:300],
        }
        return _strict(render(request, "plan.html", context))


@router.post("/plans/{plan_id}/cancel")
def cancel_plan_form(request: Request, plan_id: str, csrf_token: Annotated[str, Form(max_length=256)] = "") -> Response:
    if not csrf.valid(request, csrf_token):
        return csrf_refused(request)
    parsed = parse_job_id(plan_id)
    if parsed is None:
        return error_page(request, 404, "Plan not found", f"There is no plan {plan_id!r}.")
    with open_session(request) as session:
        try:
            plans.cancel(session, request.app.state.settings, request.app.state.redis, current_user(request), parsed)
        except HTTPException as err:  # 404, 403 (not yours), 409 (already finished)
            title = {404: "Plan not found", 403: "Not yours", 409: "Already finished"}.get(
                err.status_code, "Cannot cancel"
            )
            return error_page(request, err.status_code, title, str(err.detail))
    message = "Plan cancelled: its queued jobs were removed; running ones stop after the module they are on."
    return RedirectResponse(f"/plans/{parsed}?message={message}", status_code=303)
