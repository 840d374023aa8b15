"""/login and /logout: the dashboard signs in with an API token and keeps a server-side session
named by a signed cookie (app.sessions). Both forms carry a CSRF token (app.web.csrf): a page on
another site can neither sign a browser in (as the attacker) nor out. /logout is POST only; a
GET shows a page with the logout button."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app import auth, sessions
from app.web import csrf
from app.web.render import csrf_refused, render

router = APIRouter(include_in_schema=False)


def safe_next(value: str | None) -> str:
    """Only a path on this server: no scheme, no host, no //evil.example, no backslashes."""
    if (
        not value
        or not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or any(ord(c) < 32 for c in value)
    ):
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
    return render(request, "login.html", context, status_code=code)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: Annotated[str | None, Query(max_length=2048)] = None) -> HTMLResponse:
    return _page(request, next_url=safe_next(next))


@router.post("/login")
def login(
    request: Request,
    token: Annotated[str, Form(max_length=auth.TOKEN_MAX_LEN)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/",
    csrf_token: Annotated[str, Form(max_length=256)] = "",
) -> Response:
    target = safe_next(next)
    if not csrf.valid(request, csrf_token):  # login CSRF: another site signing this browser in
        return _page(
            request,
            error="This sign-in form was out of date or sent from another site, so nothing was "
            "done. Enter your token again.",
            next_url=target,
            code=status.HTTP_403_FORBIDDEN,
        )
    settings = request.app.state.settings
    old = request.cookies.get(auth.SESSION_COOKIE)
    with request.app.state.sessions() as session:
        user = auth.user_for_token(session, token.strip())
        if user is None:
            return _page(
                request,
                error="That token is not valid. Ask an admin for one (sparsegpt users add NAME).",
                next_url=target,
                code=status.HTTP_401_UNAUTHORIZED,
            )
        sessions.end_session(session, settings, old)  # a sign-in replaces the browser's previous session
        value = sessions.session_value(session, settings, user)
        session.commit()
    response = RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        auth.SESSION_COOKIE,
        value,
        max_age=settings.session_max_age_s,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.get("/logout", response_class=HTMLResponse)
def logout_page(request: Request) -> Response:
    """Logging out changes state, so it is a form (POST with its token); a GET shows it."""
    if getattr(request.state, "user", None) is None or not auth.auth_required(request):
        return RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
    return render(request, "logout.html", {"title": "Log out"})


@router.post("/logout")
def logout(request: Request, csrf_token: Annotated[str, Form(max_length=256)] = "") -> Response:
    """Ends the session on the server (a copy of the cookie stops working too) and clears the
    cookie."""
    if not csrf.valid(request, csrf_token):
        return csrf_refused(request)
    with request.app.state.sessions() as session:
        sessions.end_session(session, request.app.state.settings, request.cookies.get(auth.SESSION_COOKIE))
        session.commit()
    response = RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
    response.delete_cookie(auth.SESSION_COOKIE, path="/")
    return response
