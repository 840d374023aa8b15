"""Users and their uploaded calibration sets."""

from __future__ import annotations

from __future__ import annotations


from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import (
    CalibrationSet,
    User,
    utcnow,
)

# --- calibration sets -----------------------------------------------------------------------


def create_calibration_set(
    session: Session, *, name: str, format: str, size: int, sha256: str, path: str, owner_id: int | None = None
) -> CalibrationSet:
    row = CalibrationSet(
        name=name, format=format, size=size, sha256=sha256, path=path, owner_id=owner_id, created_at=utcnow()
    )
    session.add(row)
    session.flush()
    return row


def set_calibration_path(session: Session, *, set_id: int, path: str) -> None:
    session.execute(update(CalibrationSet).where(CalibrationSet.id == set_id).values(path=path))


def get_calibration_set(session: Session, set_id: int) -> CalibrationSet | None:
    return session.get(CalibrationSet, set_id)


def list_calibration_sets(session: Session, *, limit: int = 200) -> list[CalibrationSet]:
    return list(session.scalars(select(CalibrationSet).order_by(CalibrationSet.id.desc()).limit(limit)))


# --- users ------------------------------------------------------------------------------------


def create_user(session: Session, *, name: str, token_hash: str, is_admin: bool = False) -> User:
    user = User(name=name, token_hash=token_hash, is_admin=is_admin, created_at=utcnow())
    session.add(user)
    session.flush()
    return user


def get_user_by_token_hash(session: Session, token_hash: str) -> User | None:
    return session.scalars(select(User).where(User.token_hash == token_hash)).one_or_none()


def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


def get_or_create_local_user(session: Session, *, name: str) -> User:
    """The single-user mode's admin: a row (so jobs have an owner) no token can match."""
    import secrets

    user = get_user_by_name(session, name)
    if user is None:
        user = create_user(session, name=name, token_hash="!" + secrets.token_hex(31), is_admin=True)
    return user


def get_user_by_name(session: Session, name: str) -> User | None:
    return session.scalars(select(User).where(User.name == name)).one_or_none()


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.id)))
