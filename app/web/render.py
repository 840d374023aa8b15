"""Rendering a page: the Jinja2 environment (the templates of the package ``app.templates``, the
repository's templates/ directory, with the filters of ``app.web.filters``), ``render`` and
``error_page``, and the small request helpers every page uses."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from app.auth import CurrentUser
from app.models import STATUSES
from app.web import csrf
from app.web.filters import fmt_bytes, fmt_duration, fmt_ppl, fmt_secs, fmt_time, progress_view

# Where the package's templates are, installed or not (a directory: the package is never zipped).
TEMPLATES_DIR = str(files("app.templates"))
templates = Jinja2Templates(directory=TEMPLATES_DIR)
templates.env.filters.update(secs=fmt_secs, time=fmt_time, duration=fmt_duration, bytes=fmt_bytes, ppl=fmt_ppl)
templates.env.globals.update(STATUSES=STATUSES, progress_view=progress_view, csrf_token=csrf.token)


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    context.setdefault("current_user", current_user(request))
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    return csrf.remember(request, response)  # the cookie its forms' tokens are bound to, when new


def error_page(request: Request, status_code: int, title: str, message: str) -> HTMLResponse:
    return render(request, "error.html", {"title": title, "message": message, "code": status_code}, status_code)


def csrf_refused(request: Request) -> HTMLResponse:
    """403: the page to show instead of doing what a forged or stale form asked (app.web.csrf said no)."""
    return error_page(
        request,
        403,
        "Reload the form",
        "This form's security token is missing or out of date (it was opened before you signed in or out, "
        "or it was sent from another site), so nothing was done. Reload the page and submit the form again.",
    )


def open_session(request: Request) -> Session:
    """A database session for one page (``with open_session(request) as session``): open while
    the template renders, since templates read the job's relationships."""
    return request.app.state.sessions()


def current_user(request: Request) -> CurrentUser | None:
    """The signed-in user ``app.auth.authenticate`` found (never None on a page's route)."""
    return getattr(request.state, "user", None)


def parse_job_id(raw: str) -> int | None:
    """A job id from a path or query string, or None for anything else (a 404 or 400 page)."""
    raw = raw.strip()
    if not raw.isdigit() or len(raw) > 10:
        return None
    value = int(raw)
    return value if 1 <= value <= 2**31 - 1 else None
