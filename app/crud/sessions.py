"""The dashboard's server-side sessions (``web_sessions``): a row per sign-in, keyed by the
sha256 of the random session id the signed cookie carries; logout, a new token or a removed
user revokes it (app.sessions decides what a cookie is worth)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, or_, update
from sqlalchemy.orm import Session

from app.models import WebSession, utcnow


def create_web_session(session: Session, *, key: str, user_id: int, expires_at: datetime) -> WebSession:
    row = WebSession(id=key, user_id=user_id, created_at=utcnow(), expires_at=expires_at, revoked_at=None)
    session.add(row)
    session.flush()
    return row


def get_web_session(session: Session, key: str) -> WebSession | None:
    return session.get(WebSession, key)


def revoke_web_session(session: Session, key: str) -> bool:
    """Ends one session now; False when there was no live one."""
    result = session.execute(
        update(WebSession).where(WebSession.id == key, WebSession.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    return result.rowcount > 0


def revoke_user_sessions(session: Session, user_id: int) -> int:
    """Ends every session of a user (a new token, a removed user); returns how many were live."""
    result = session.execute(
        update(WebSession)
        .where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return result.rowcount


def purge_web_sessions(session: Session, *, user_id: int | None = None) -> int:
    """Deletes rows that no longer admit anyone (expired or revoked), of one user or all."""
    now = utcnow()
    query = delete(WebSession).where(or_(WebSession.expires_at <= now, WebSession.revoked_at.is_not(None)))
    if user_id is not None:
        query = query.where(WebSession.user_id == user_id)
    return session.execute(query).rowcount
