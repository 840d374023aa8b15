"""Who is asking: a Bearer token, the dashboard's signed session cookie, or (single-user mode
only) the built-in local admin.

The edge (app.guard) calls ``resolve_user`` from the headers alone, before a route runs or any
body is read, and answers 401 (API, with WWW-Authenticate) or a redirect to /login (dashboard
pages) when a signed-in user is required and none is given; ``authenticate``, a dependency
applied to the whole app (app.main), then takes its answer as ``request.state.user`` (and
decides itself for an app without the edge). /health, /login, /logout, static files and the
API docs are left open.

The mode comes from settings.auth: "required", "off" (single-user: everyone is the local
admin; `sparsegpt serve` refuses it on a non-loopback address), or unset: `sparsegpt serve`
decides from --host; an app made some other way (``uvicorn --factory``) then lets a request
in without credentials only when it arrived on a loopback address.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from app import auth_cache, crud
from app import sessions as sessions_mod
from app.config import Settings, is_loopback
from app.tokens import LOCAL_USER, hash_token

SESSION_COOKIE = sessions_mod.SESSION_COOKIE
# the API docs' pages are routes of the app (app.main: served without a CDN), so they are listed here
PUBLIC_PATHS = frozenset({"/health", "/login", "/logout", "/favicon.ico", "/docs", "/docs/oauth2-redirect", "/redoc"})
PUBLIC_PREFIXES = ("/static/",)
TOKEN_MAX_LEN = 512


@dataclass(frozen=True)
class CurrentUser:
    """The signed-in user, detached from any database session."""

    id: int
    name: str
    is_admin: bool
    local: bool = False  # the single-user mode's built-in admin

    def may_manage(self, owner_id: int | None) -> bool:
        """Cancel, retry, delete: the job's owner or an admin."""
        return self.is_admin or (owner_id is not None and owner_id == self.id)


def user_for_token(session, token: str):
    """The user whose token this is, or None; the stored hash is compared in constant time."""
    if not token or len(token) > TOKEN_MAX_LEN:
        return None
    digest = hash_token(token)
    user = crud.get_user_by_token_hash(session, digest)
    if user is None or not hmac.compare_digest(user.token_hash, digest):
        return None
    return user


def auth_required(request: Request) -> bool:
    mode = request.app.state.settings.auth
    if mode is not None:
        return mode == "required"
    server = request.scope.get("server")
    return not (server and is_loopback(str(server[0])))


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _wants_page(request: Request) -> bool:
    """A dashboard page (redirect to /login) rather than the API (401): any page GET, and a
    browser's form POST (it asks for text/html; the 303 turns it into GET /login)."""
    path = request.url.path
    if path.startswith("/api/"):
        return False
    if request.method in ("GET", "HEAD"):
        return True
    return "text/html" in request.headers.get("accept", "")


def unauthorized(request: Request, reason: str) -> HTTPException:
    if _wants_page(request) and not request.headers.get("authorization"):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return HTTPException(
            status.HTTP_303_SEE_OTHER, detail=reason, headers={"Location": f"/login?next={quote(target, safe='/')}"}
        )
    headers = {"WWW-Authenticate": 'Bearer realm="sparsegpt"'}
    if request.headers.get("hx-request"):
        headers["HX-Redirect"] = "/login"
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=reason, headers=headers)


def _current(user, *, local: bool = False) -> CurrentUser:
    local = local or user.name == LOCAL_USER  # the local user's own token (`sparsegpt users token`)
    return CurrentUser(id=user.id, name=user.name, is_admin=bool(user.is_admin), local=local)


def _token_user(sessions, token: str) -> CurrentUser | None:
    with sessions() as session:
        user = user_for_token(session, token)
        return _current(user) if user is not None else None


def _cookie_user(sessions, settings: Settings, cookie: str) -> CurrentUser | None:
    with sessions() as session:
        user = sessions_mod.user_for_cookie(session, settings, cookie)
        return _current(user) if user is not None else None


def _bearer(request: Request) -> str | None:
    """The Authorization header as resolve_user reads it (None: no credential there)."""
    header = request.headers.get("authorization")
    if header is not None and not auth_required(request) and header.strip().lower() == "bearer":
        return None  # single-user mode: `-H "Authorization: Bearer $TOKEN"` with TOKEN unset is no credential
    return header


def remembered_user(request: Request) -> CurrentUser | None:
    """The user resolve_user would answer, when its credential (a well-formed Bearer token, or the
    session cookie of a request without one) is remembered (app.auth_cache): no database, so the
    edge can answer it in the event loop. None: ask resolve_user (a lookup, or a refusal)."""
    database = request.app.state.settings.database
    header = _bearer(request)
    if header is not None:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > TOKEN_MAX_LEN:
            return None
        return auth_cache.peek(database, "token", hash_token(token))
    cookie = request.cookies.get(SESSION_COOKIE)
    return auth_cache.peek(database, "cookie", cookie) if cookie else None


def resolve_user(request: Request) -> CurrentUser | None:
    """The user the request's credentials name; raises 401 for a bad token or cookie-less
    request when sign-in is required; None on a public path without credentials."""
    settings: Settings = request.app.state.settings
    header = _bearer(request)
    sessions = request.app.state.sessions
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized(request, "the Authorization header must be: Bearer <token>")
        token = token.strip()
        current = auth_cache.remembered(
            settings.database, "token", hash_token(token), lambda: _token_user(sessions, token)
        )
        if current is None:
            raise unauthorized(request, "the API token is not valid (ask an admin for one: sparsegpt users add NAME)")
        return current
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        current = auth_cache.remembered(
            settings.database, "cookie", cookie, lambda: _cookie_user(sessions, settings, cookie)
        )
        if current is not None:
            return current
    if not auth_required(request):
        local = request.app.state.local_user
        return local
    if is_public(request.url.path):
        return None
    reason = "your session has expired; sign in again" if cookie else "sign in: send Authorization: Bearer <token>"
    raise unauthorized(request, reason)


# Declares the scheme in the OpenAPI document (the docs' Authorize button); the header itself is
# read by resolve_user, which also takes the session cookie.
bearer_scheme = HTTPBearer(auto_error=False, description="an API token from `sparsegpt users add NAME`")


def _decide(request: Request) -> CurrentUser | None:
    """authenticate's work for a request no outer layer decided (an app without the edge)."""
    if is_public(request.url.path):
        try:
            user = resolve_user(request)
        except HTTPException:
            user = None
    else:
        user = resolve_user(request)
    request.state.user = user
    request.state.user_resolved = True
    return user


async def authenticate(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None
) -> CurrentUser | None:
    """The app-wide dependency: sets request.state.user (None only on public paths). When an
    outer layer already decided (before the body was read), its answer stands, read in the
    event loop (no thread-pool hop per request); else it is decided in the thread pool (a
    database lookup)."""
    if getattr(request.state, "user_resolved", False):
        return request.state.user
    return await run_in_threadpool(_decide, request)


async def require_user(request: Request) -> CurrentUser:
    """For route parameters: the user ``authenticate`` found."""
    if getattr(request.state, "user_resolved", False):
        user = request.state.user
    else:
        user = await run_in_threadpool(_decide, request)
    if user is None:
        raise unauthorized(request, "sign in: send Authorization: Bearer <token>")
    return user


UserDep = Annotated[CurrentUser, Depends(require_user)]


def ensure_local_user(sessions) -> CurrentUser:
    """Create (once) the single-user mode's admin row; safe when several processes race."""
    from sqlalchemy.exc import IntegrityError

    for _ in range(3):
        session = sessions()
        try:
            user = crud.get_or_create_local_user(session, name=LOCAL_USER)
            session.commit()
            return _current(user, local=True)
        except IntegrityError:
            session.rollback()
        finally:
            session.close()
    raise RuntimeError("could not create the local user")
