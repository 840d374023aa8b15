"""Users and their uploaded calibration sets."""

from __future__ import annotations

import re
from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.models import (
    QUEUED,
    RUNNING,
    CalibrationSet,
    Job,
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


def upload_usage(session: Session, *, owner_id: int) -> tuple[int, int]:
    """(files, bytes) of the calibration sets a user owns."""
    count, total = session.execute(
        select(func.count(), func.coalesce(func.sum(CalibrationSet.size), 0)).where(CalibrationSet.owner_id == owner_id)
    ).one()
    return int(count), int(total)


def calibration_sets_created_before(session: Session, *, before: datetime, limit: int = 1000) -> list[int]:
    query = select(CalibrationSet.id).where(CalibrationSet.created_at < before).order_by(CalibrationSet.id).limit(limit)
    return list(session.scalars(query))


_UPLOAD_REF = re.compile(r"^\s*upload:(\d{1,12})\s*$")


def uploads_in_use(session: Session) -> dict[int, list[int]]:
    """Upload id -> the ids of the queued or running jobs whose spec names it (``upload:<id>``
    as the calibration dataset or an evaluation dataset)."""
    used: dict[int, list[int]] = {}
    for job_id, spec in session.execute(select(Job.id, Job.spec).where(Job.status.in_((QUEUED, RUNNING)))):
        spec = spec if isinstance(spec, dict) else {}
        names = [(spec.get("calibration") or {}).get("dataset")]
        names += list((spec.get("evaluation") or {}).get("datasets") or [])
        for name in names:
            match = _UPLOAD_REF.match(name) if isinstance(name, str) else None
            if match and job_id not in used.setdefault(int(match.group(1)), []):
                used[int(match.group(1))].append(job_id)
    return used


def delete_calibration_set(session: Session, *, set_id: int) -> str | None:
    """Removes the row (not committed); its file's path, or None when there was no such row."""
    path = session.scalar(select(CalibrationSet.path).where(CalibrationSet.id == set_id))
    if path is None:
        return None
    done = session.execute(
        delete(CalibrationSet).where(CalibrationSet.id == set_id).execution_options(synchronize_session=False)
    ).rowcount
    return path if done else None


def calibration_path_in_use(session: Session, path: str) -> bool:
    """Whether a calibration set still names this stored file (the same content uploaded twice
    is one content-addressed file)."""
    return session.scalar(select(func.count()).select_from(CalibrationSet).where(CalibrationSet.path == path)) > 0


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
