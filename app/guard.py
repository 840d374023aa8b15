"""The edge: a pure-ASGI layer outside every route (installed last, so outermost, by app.main).

For each HTTP request, before any route runs and before any of the body is read:

1. **Host**: the Host header must name this server: a loopback name (localhost, 127.0.0.1,
   [::1]), the address the connection arrived on, the address ``sparsegpt serve --host`` binds,
   or a name in settings.allowed_hosts ("*": any). Otherwise 400: a page on another site that
   rebinds its DNS name to this server cannot read it (DNS rebinding).
2. **Cross-site requests** (POST, PUT, PATCH, DELETE), in both modes: a request without an
   Authorization header must come from this server's own pages: its Origin (else its Referer)
   must be this server's own scheme://host:port; with neither, it must carry no browser mark
   (no Sec-Fetch-Site other than same-origin/none, no session cookie): a script or API client,
   which has no ambient credentials a page could borrow. Otherwise 403. In team mode the
   session cookie changes nothing on /api/*: API clients send ``Authorization: Bearer``.
3. **Who is asking**: the user is resolved from the headers alone (app.auth.resolve_user:
   Bearer token, session cookie, single-user mode); 401 / a redirect to /login comes before
   the body is read. A credential remembered for a moment (app.auth_cache) and single-user
   mode's local user are decided in the event loop, with no database, route match or thread.
4. **Body caps**: settings.max_body_bytes for JSON and form routes, the upload cap (plus the
   multipart framing) for uploads; a larger Content-Length is refused at once, and a body
   (chunked too) is counted as it streams: 413 when it passes the cap. It must also come at an
   average of MIN_BODY_RATE after a grace of settings.header_timeout_s (the time spent waiting
   for it): else 408 and the connection closes (a body sent a byte at a time holds no socket).
5. **JSON numbers and strings**: NaN, Infinity, numbers that overflow and lone surrogates are
   no JSON this service takes: 422 with the reason.

Every response gets the security headers (no framing, nosniff, same-origin referrers) and
``Cache-Control: no-store`` unless it is a static file or chose its own.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import auth
from app.config import Settings
from app.json_body import json_problem, printable
from app.services.uploads import MULTIPART_OVERHEAD

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Routes whose body is a file upload, read by app.services.uploads under the upload cap; the
# edge's own cap sits above it, so the route's clearer refusal wins when both apply.
UPLOAD_ROUTES = frozenset({("POST", "/api/v1/calibration-sets"), ("POST", "/jobs/new")})
SECURITY_HEADERS = (
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)
API_NEEDS_BEARER = (
    "the session cookie does not change anything over /api/*: API clients send "
    "Authorization: Bearer <token> (sparsegpt users add NAME)"
)
MIN_BODY_RATE = 16 * 1024  # bytes/s: the slowest average a request body may come at, after its grace
SLOW_BODY = f"the request body came too slowly (under {MIN_BODY_RATE // 1024} KiB/s on average)"


class BodyRefused(HTTPException):
    """Raised from ``receive``: the body passed its cap (413) or came too slowly (408). FastAPI
    answers it, with Connection: close (the rest of the body is not read)."""


def split_host(host: str) -> tuple[str, int | None]:
    """'Example.com:8000' -> ('example.com', 8000); '[::1]:80' -> ('::1', 80); port None if absent
    (a malformed port makes the name empty: never allowed)."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
    else:
        name, port = host, ""
    if port and not port.isdigit():
        return "", None
    return name.rstrip("."), int(port) if port else None


def allowed_names(settings: Settings, bind_host: str | None) -> tuple[frozenset[str], bool]:
    """The Host names this server answers to, and whether any name is (allowed_hosts "*")."""
    names = {split_host(h)[0] for h in settings.allowed_hosts.split(",") if h.strip()}
    any_host = "*" in names
    names |= LOOPBACK_NAMES
    if bind_host and bind_host.strip("[]") not in ("0.0.0.0", "::", ""):
        names.add(split_host(bind_host if bind_host.count(":") <= 1 else f"[{bind_host.strip('[]')}]")[0])
    return frozenset(n for n in names if n and n != "*"), any_host


def origin_of(url: str) -> str | None:
    """scheme://host:port of a URL (the port written out), or None when it has none."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    port = port or (443 if parts.scheme == "https" else 80)
    name = parts.hostname.lower().rstrip(".")
    return f"{parts.scheme}://{'[' + name + ']' if ':' in name else name}:{port}"


def own_origin(scope: Scope, host: str) -> str | None:
    return origin_of(f"{scope.get('scheme', 'http')}://{host}")


def cross_site_reason(scope: Scope, headers: dict[str, str], host: str) -> str | None:
    """Why an unsafe-method request may have been sent by a page on another site, or None.
    Requests with an Authorization header are let through here (a page cannot add one to a
    cross-site request; the token itself is checked next)."""
    if "authorization" in headers:
        return None
    own = own_origin(scope, host)
    origin = headers.get("origin")
    if origin is not None:
        if origin_of(origin) != own or own is None:
            hint = ""
            if origin.startswith("https://") and scope.get("scheme") == "http":
                hint = " (behind a TLS proxy: set SPARSEGPT_FORWARDED_ALLOW_IPS to the proxy's address)"
            return f"cross-site request refused: Origin {printable(origin)} is not this server ({own}){hint}"
        return None
    referer = headers.get("referer")
    if referer:
        if origin_of(referer) != own or own is None:
            return (
                f"cross-site request refused: Referer from {printable(origin_of(referer) or 'elsewhere')} is "
                f"not this server ({own})"
            )
        return None
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request refused: Sec-Fetch-Site {printable(site, 16)} without an Origin header"
    if auth.SESSION_COOKIE in headers.get("cookie", ""):
        return (
            "a request signed in with the session cookie must come from this server's pages (no Origin or "
            "Referer header)"
        )
    return None


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name: the first of repeated ones, cookies joined."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        if name == "cookie" and name in headers:
            headers[name] += "; " + value
        else:
            headers.setdefault(name, value)
    return headers


def _is_json(headers: dict[str, str]) -> bool:
    """FastAPI parses a body as JSON when its type is application/json or */*+json, or absent."""
    kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return not kind or kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class Guard:
    """The ASGI layer (see the module's docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings,
        bind_host: str | None = None,
        open_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app, self.settings = app, settings
        self.names, self.any_host = allowed_names(settings, bind_host)
        self.open_paths = open_paths  # the API docs: no sign-in, no body
        self.upload_cap = settings.max_upload_bytes + 2 * MULTIPART_OVERHEAD

    def host_allowed(self, scope: Scope, host: str | None) -> bool:
        if self.any_host:
            return True
        if not host:
            return False
        name, _ = split_host(host)
        server = scope.get("server")
        return name in self.names or bool(server and name == str(server[0]).lower())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._with_headers(scope, send)
        headers = _headers(scope)
        method, path = scope["method"], scope["path"]
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        host = headers.get("host")
        if not self.host_allowed(scope, host):
            shown = printable(split_host(host)[0] if host else "(none)")
            await _send(PlainTextResponse(f"Host not allowed: {shown}", 400), scope, receive, send, has_body)
            return
        if method in UNSAFE_METHODS:
            reason = cross_site_reason(scope, headers, host)
            if reason:
                await _send(JSONResponse({"detail": reason}, 403), scope, receive, send, has_body)
                return
        if auth.is_public(path):
            _settle_public(scope, headers)
        elif path not in self.open_paths and not _signed_in(scope, headers, method, path) and _routed(scope):
            refusal = await self._authenticate(scope, headers, method, path)
            if refusal is not None:
                await _send(refusal, scope, receive, send, has_body)
                return
        if (method, path) in UPLOAD_ROUTES:
            cap = self.upload_cap
            reason = f"the upload is larger than this server's upload limit of {self.settings.max_upload_bytes} bytes"
        else:
            cap = self.settings.max_body_bytes
            reason = f"the request body is larger than this server's limit of {cap} bytes (SPARSEGPT_MAX_BODY_BYTES)"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            await _send(JSONResponse({"detail": reason}, 413), scope, receive, send, True)
            return
        receive = _capped(receive, cap, reason, self.settings.header_timeout_s)
        if has_body and method in UNSAFE_METHODS and _is_json(headers) and (method, path) not in UPLOAD_ROUTES:
            try:
                body, receive = await _buffer(receive)
            except BodyRefused as err:
                await _send(JSONResponse({"detail": err.detail}, err.status_code), scope, receive, send, True)
                return
            problem = json_problem(body)
            if problem:
                detail = [{"loc": ["body"], "msg": problem, "type": "json_invalid"}]
                await _send(JSONResponse({"detail": detail}, 422), scope, receive, send, False)
                return
        try:
            await self.app(scope, receive, send)
        except BodyRefused as err:  # raised where no handler answered it (before any response)
            if send.started:
                raise
            await _send(JSONResponse({"detail": err.detail}, err.status_code), scope, receive, send, True)

    async def _authenticate(self, scope: Scope, headers: dict[str, str], method: str, path: str) -> Response | None:
        """Resolve the user from the headers (no body read); the refusal to send, or None."""
        request = Request(scope)
        try:
            cookie = auth.SESSION_COOKIE in headers.get("cookie", "")
            if (
                method in UNSAFE_METHODS
                and path.startswith("/api/")
                and cookie
                and "authorization" not in headers
                and auth.auth_required(request)
            ):
                raise auth.unauthorized(request, API_NEEDS_BEARER)
            if cookie or "authorization" in headers:
                user = await run_in_threadpool(auth.resolve_user, request)  # a database lookup
            else:
                user = auth.resolve_user(request)
        except HTTPException as err:
            return JSONResponse({"detail": err.detail}, err.status_code, headers=err.headers)
        request.state.user = user
        request.state.user_resolved = True
        return None

    def _with_headers(self, scope: Scope, send: Send) -> Send:
        static = scope["path"].startswith("/static/")

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                wrapped.started = True
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in present]
                if not static and b"cache-control" not in present:
                    extra.append((b"cache-control", b"no-store"))
                if message["status"] in (408, 413) and b"connection" not in present:
                    extra.append((b"connection", b"close"))  # the rest of the body is not read
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        wrapped.started = False
        return wrapped


def _signed_in(scope: Scope, headers: dict[str, str], method: str, path: str) -> bool:
    """The common case decided without the database, the route table or the thread pool: a
    remembered credential (app.auth_cache), or single-user mode's local user for a request
    without any. True: request.state.user is set. False: Guard._authenticate decides (a
    lookup, or a refusal), for routed requests only."""
    if method in UNSAFE_METHODS and path.startswith("/api/") and "authorization" not in headers:
        return False  # the session cookie's refusal over the API is _authenticate's
    request = Request(scope)
    if "authorization" in headers or auth.SESSION_COOKIE in headers.get("cookie", ""):
        user = auth.remembered_user(request)
    elif not auth.auth_required(request):
        user = auth.resolve_user(request)  # the local user: no credential, no lookup
    else:
        return False
    if user is None:
        return False
    request.state.user = user
    request.state.user_resolved = True
    return True


def _settle_public(scope: Scope, headers: dict[str, str]) -> None:
    """A public path (/health, /login, ...) still learns who is asking (the full health report
    is for signed-in users): decided here when no database is needed (no credential, or a
    remembered one), so the route's dependency takes it without a thread-pool hop; else left
    to app.auth.authenticate."""
    request = Request(scope)
    if "authorization" not in headers and auth.SESSION_COOKIE not in headers.get("cookie", ""):
        try:
            user = auth.resolve_user(request)
        except HTTPException:
            user = None
    else:
        user = auth.remembered_user(request)
        if user is None:
            return
    request.state.user = user
    request.state.user_resolved = True


def _routed(scope: Scope) -> bool:
    """Whether a route takes this method and path (else the app answers 404/405 as before, with
    no sign-in asked and no body read)."""
    router = getattr(scope.get("app"), "router", None)
    if router is None:
        return True
    return any(route.matches(scope)[0] == Match.FULL for route in router.routes)


def _capped(receive: Receive, cap: int, reason: str, grace_s: float) -> Receive:
    """``receive`` that counts the body's bytes: BodyRefused 413 past the cap, 408 when the time
    spent waiting for the body passes grace_s + its bytes so far / MIN_BODY_RATE (uvicorn's
    receive may be cancelled: what arrived waits for the next call)."""
    count, waited, done = 0, 0.0, False

    async def wrapped() -> Message:
        nonlocal count, waited, done
        if done:  # the body is complete: a wait for the disconnect (SSE) has no deadline
            return await receive()
        started = time.monotonic()
        try:
            message = await asyncio.wait_for(receive(), max(0.0, grace_s + count / MIN_BODY_RATE - waited))
        except asyncio.TimeoutError:  # (Python 3.10: not the builtin TimeoutError)
            raise BodyRefused(408, SLOW_BODY) from None
        waited += time.monotonic() - started
        done = message["type"] != "http.request" or not message.get("more_body", False)
        count += len(message.get("body", b""))
        if count > cap:
            raise BodyRefused(413, reason)
        return message

    return wrapped


async def _buffer(receive: Receive) -> tuple[bytes, Receive]:
    """The whole (capped) body, and a ``receive`` that gives it to the app again."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def _send(response: Response, scope: Scope, receive: Receive, send: Send, unread_body: bool) -> None:
    """Answer without reading the body; the connection closes after it when a body is left
    unread (the server does not drain what it refused)."""
    if unread_body:
        response.headers["connection"] = "close"
    await response(scope, receive, send)
