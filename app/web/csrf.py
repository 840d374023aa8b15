"""Form tokens against cross-site request forgery: every dashboard form that changes something
(a new job, cancel, retry, sign in, log out) carries a hidden ``csrf_token`` that a page on
another site cannot know, and the route refuses a browser's POST without the right one (403,
a page that says to reload the form).

The token is an HMAC (the session secret) of what the browser holds:

- signed in: the session (its stored key, from the signed session cookie), so a token is
  worth nothing in another session and dies with the session;
- not signed in (the sign-in form, single-user mode): a random ``sparsegpt_csrf`` cookie
  (HttpOnly, SameSite=Lax) set with the first form: a double-submit cookie that a page on
  another site can neither read nor match, so it cannot sign a victim in as someone else.

This is the second layer: the edge (app.guard) refuses state-changing requests whose Origin
or Referer is another site before any route runs. Requests that carry no browser marks at all
(no Origin, Referer or Sec-Fetch-Site header and no session cookie: scripts, API clients) and
requests signed with a Bearer token carry no ambient credentials a page could borrow, and are
let through; every browser sends Origin with a POST.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import Request
from fastapi.responses import Response

from app import sessions

CSRF_COOKIE = "sparsegpt_csrf"
FIELD = "csrf_token"
_COOKIE_LEN = 43  # secrets.token_urlsafe(32)
_BROWSER_HEADERS = ("origin", "referer", "sec-fetch-site")


def _well_formed(value: str | None) -> bool:
    return (
        bool(value) and len(value) == _COOKIE_LEN and value.isascii() and all(c.isalnum() or c in "-_" for c in value)
    )


def _binding(request: Request, *, create: bool) -> str | None:
    """What this browser's tokens are bound to: its session, else its csrf cookie (made when
    ``create`` and there is none yet; the page's response sets it, see ``remember``)."""
    settings = request.app.state.settings
    key = sessions.session_id(settings, request.cookies.get(sessions.SESSION_COOKIE))
    if key is not None:
        return "session:" + key
    value = getattr(request.state, "csrf_cookie", None) or request.cookies.get(CSRF_COOKIE)
    if not _well_formed(value):
        if not create:
            return None
        value = request.state.csrf_cookie = secrets.token_urlsafe(32)
    return "browser:" + value


def _sign(request: Request, binding: str) -> str:
    secret = request.app.state.settings.session_secret().encode()
    return hmac.new(secret, b"sparsegpt-csrf\x00" + binding.encode(), hashlib.sha256).hexdigest()


def token(request: Request) -> str:
    """The token a form of this page carries (templates: ``csrf_token(request)``)."""
    return _sign(request, _binding(request, create=True))


def needs_token(request: Request) -> bool:
    """Whether a state-changing request must carry a valid token: it may come from a browser
    (a session cookie, or any header only browsers add) and is not signed with a valid Bearer
    token (a page cannot add one)."""
    if request.headers.get("authorization") and getattr(request.state, "user", None) is not None:
        return False
    if sessions.SESSION_COOKIE in request.cookies:
        return True
    return any(name in request.headers for name in _BROWSER_HEADERS)


def can_pass(request: Request) -> bool:
    """False when no token could be valid (it needs one, and the browser holds nothing to bind
    it to): refused before a large body is read."""
    return not needs_token(request) or _binding(request, create=False) is not None


def valid(request: Request, submitted: str | None) -> bool:
    """The form's token matches this browser's session or cookie (compared in constant time),
    or the request needs none."""
    if not needs_token(request):
        return True
    binding = _binding(request, create=False)
    if binding is None or not submitted or len(submitted) != 64 or not submitted.isascii():
        return False
    return hmac.compare_digest(_sign(request, binding).encode(), submitted.encode())


def remember(request: Request, response: Response) -> Response:
    """Sets the csrf cookie a page's form tokens were bound to when it was made for this page."""
    value = getattr(request.state, "csrf_cookie", None)
    if value and request.cookies.get(CSRF_COOKIE) != value:
        response.set_cookie(
            CSRF_COOKIE,
            value,
            max_age=request.app.state.settings.session_max_age_s,
            path="/",
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
        )
    return response
