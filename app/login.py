"""/login and /logout: the dashboard signs in with an API token and keeps a signed session
cookie (itsdangerous; the secret comes from the settings or the data directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from app import auth, sessions

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
router = APIRouter(include_in_schema=False)


def safe_next(value: str | None) -> str:
    """Only a path on this server: no scheme, no host, no //evil.example, no backslashes."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or any(ord(c) < 32 for c in value):
        return "/"
    return value


def _page(request: Request, *, error: str | None = None, next_url: str = "/", code: int = 200) -> HTMLResponse:
    settings = request.app.state.settings
    context = {
        "error": error,
        "next": next_url,
        "single_user": not auth.auth_required(request),
        "user": getattr(request.state, "user", None),
        "title": "Sign in",
        "session_days": round(settings.session_max_age_s / 86400, 1),
    }
    return templates.TemplateResponse(request, "login.html", context, status_code=code)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: Annotated[str | None, Query(max_length=2048)] = None) -> HTMLResponse:
    return _page(request, next_url=safe_next(next))


@router.post("/login")
def login(
    request: Request,
    token: Annotated[str, Form(max_length=auth.TOKEN_MAX_LEN)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/",
) -> Response:
    target = safe_next(next)
    with request.app.state.sessions() as session:
        user = auth.user_for_token(session, token.strip())
    if user is None:
        return _page(request, error="That token is not valid. Ask an admin for one (sparsegpt users add NAME).",
                     next_url=target, code=status.HTTP_401_UNAUTHORIZED)
    settings = request.app.state.settings
    response = RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        auth.SESSION_COOKIE, sessions.session_value(settings, user), max_age=settings.session_max_age_s,
        httponly=True, samesite="lax", secure=request.url.scheme == "https", path="/",
    )
    return response


@router.api_route("/logout", methods=["GET", "POST"])
def logout() -> Response:
    response = RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
    response.delete_cookie(auth.SESSION_COOKIE, path="/")
    return response
