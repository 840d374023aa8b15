"""The dashboard's sign-in sessions: server-side rows, named by a signed cookie.

Signing in makes a random session id; the cookie carries it (with the user's id and a tag of
the token the session was made with), signed with itsdangerous (the secret from the settings
or the data directory); the database keeps only the id's sha256 in ``web_sessions`` with an
expiry. A cookie names a user only while its row is there, not revoked and not expired, the
user still exists and still has the token the session was made with. So logging out (POST
/logout revokes the row), a new token (``sparsegpt users token``) or removing the user ends the
session at once, even for a copy of the cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from itsdangerous import BadSignature, URLSafeTimedSerializer

from app import auth_cache, crud
from app.config import Settings
from app.models import utcnow

SESSION_COOKIE = "sparsegpt_session"
_SID_LEN = 43  # secrets.token_urlsafe(32)


def serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(settings.session_secret(), salt="sparsegpt-session")


def _token_tag(settings: Settings, token_hash: str) -> str:
    """Binds a session to the token it was made with, without showing anything of the token."""
    return hmac.new(settings.session_secret().encode(), token_hash.encode(), hashlib.sha256).hexdigest()[:32]


def session_key(sid: str) -> str:
    """What the database keeps of a session id: its sha256 (hex)."""
    return hashlib.sha256(sid.encode()).hexdigest()


def _read(settings: Settings, value: str | None) -> tuple[str, int, str] | None:
    """(session id, user id, token tag) of a cookie whose signature and age hold, else None."""
    if not value or len(value) > 1024:
        return None
    try:
        data = serializer(settings).loads(value, max_age=settings.session_max_age_s)
        sid, uid, tag = str(data["sid"]), int(data["uid"]), str(data["th"])
    except (BadSignature, KeyError, TypeError, ValueError):
        return None
    if len(sid) != _SID_LEN:
        return None
    return sid, uid, tag


def session_value(session, settings: Settings, user) -> str:
    """Starts a session for ``user`` (a row in ``session``; the caller commits) and returns the
    cookie's value. The user's rows that no longer admit anyone are cleared on the way."""
    sid = secrets.token_urlsafe(32)
    crud.purge_web_sessions(session, user_id=user.id)
    crud.create_web_session(
        session,
        key=session_key(sid),
        user_id=user.id,
        expires_at=utcnow() + timedelta(seconds=settings.session_max_age_s),
    )
    return serializer(settings).dumps({"sid": sid, "uid": user.id, "th": _token_tag(settings, user.token_hash)})


def user_for_cookie(session, settings: Settings, value: str):
    """The user a session cookie names, or None (forged, too old, logged out, revoked, a user
    since removed or given a new token)."""
    read = _read(settings, value)
    if read is None:
        return None
    sid, uid, tag = read
    row = crud.get_web_session(session, session_key(sid))
    if row is None or row.revoked_at is not None or row.expires_at <= utcnow() or row.user_id != uid:
        return None
    user = crud.get_user(session, uid)
    if user is None or not hmac.compare_digest(_token_tag(settings, user.token_hash), tag):
        return None
    return user


def session_id(settings: Settings, value: str | None) -> str | None:
    """The stored key of the session a cookie names when its signature and age hold (the row
    is not consulted): what a signed-in user's form tokens are bound to (app.web.csrf)."""
    read = _read(settings, value)
    return session_key(read[0]) if read else None


def end_session(session, settings: Settings, value: str | None) -> bool:
    """Logout: revokes the session a cookie names (the caller commits); False when none."""
    key = session_id(settings, value)
    auth_cache.forget_all()  # this process stops admitting the cookie at once (others within its TTL)
    return key is not None and crud.revoke_web_session(session, key)
