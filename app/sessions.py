"""The dashboard's sign-in session: the cookie's value and the user it names.

The cookie is signed (itsdangerous, the secret from the settings or the data directory) and
bound to the token it was made with, so a new token ends every session made with the old one.
"""

from __future__ import annotations

import hashlib
import hmac

from itsdangerous import BadSignature, URLSafeTimedSerializer

from app import crud
from app.config import Settings

SESSION_COOKIE = "sparsegpt_session"


def serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(settings.session_secret(), salt="sparsegpt-session")


def _token_tag(settings: Settings, token_hash: str) -> str:
    """Binds a session to the token it was made with, without showing anything of the token."""
    return hmac.new(settings.session_secret().encode(), token_hash.encode(), hashlib.sha256).hexdigest()[:32]


def session_value(settings: Settings, user) -> str:
    """The cookie's content: the user's id and a tag of its token, signed; a new token (or a
    removed user) ends every session made with the old one."""
    return serializer(settings).dumps({"uid": user.id, "th": _token_tag(settings, user.token_hash)})


def user_for_cookie(session, settings: Settings, value: str):
    try:
        data = serializer(settings).loads(value, max_age=settings.session_max_age_s)
        uid, fragment = int(data["uid"]), str(data["th"])
    except (BadSignature, KeyError, TypeError, ValueError):
        return None
    user = crud.get_user(session, uid)
    if user is None or not hmac.compare_digest(_token_tag(settings, user.token_hash), fragment):
        return None
    return user
