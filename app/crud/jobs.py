"""Jobs as the API and the dashboard see them: create, read, list, cancel, delete."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Select, bindparam, case, delete, func, select, update
from sqlalchemy.orm import Session, selectinload

from app.models import (
    CANCELLED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Artifact,
    Job,
    User,
    utcnow,
)

# --- jobs: the API side -------------------------------------------------------------------


def create_job(
    session: Session,
    *,
    spec: dict[str, Any],
    owner_id: int | None = None,
    idempotency_key: str | None = None,
    spec_sha256: str | None = None,
    retry_of: int | None = None,
    queue: str | None = None,
) -> Job:
    sparsity = spec["sparsity"]
    job = Job(
        spec=spec,
        model=spec["model"],
        method=spec["method"],
        sparsity=sparsity if isinstance(sparsity, str) else f"{sparsity:g}",
        status=QUEUED,
        attempt=0,
        owner_id=owner_id,
        created_at=utcnow(),
        idempotency_key=idempotency_key,
        spec_sha256=spec_sha256,
        queue=queue,
        retry_of=retry_of,
    )
    session.add(job)
    session.flush()
    return job


def set_task_id(session: Session, *, job_id: int, task_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(celery_task_id=task_id, enqueued_at=utcnow()))


def get_job_by_idempotency_key(session: Session, *, owner_id: int, key: str) -> Job | None:
    return (
        session.scalars(select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key)).unique().one_or_none()
    )


def lock_user(session: Session, user_id: int) -> None:
    """Serialize one user's submissions until the transaction ends: a no-op UPDATE takes the
    row lock on PostgreSQL and the write lock on SQLite, so two requests cannot both pass the cap."""
    session.execute(update(User).where(User.id == user_id).values(is_admin=User.is_admin))


def count_active_jobs(session: Session, *, owner_id: int) -> int:
    return (
        session.scalar(
            select(func.count()).select_from(Job).where(Job.owner_id == owner_id, Job.status.in_((QUEUED, RUNNING)))
        )
        or 0
    )


def delete_job(session: Session, *, job_id: int) -> str:
    """Removes a job that is not running (queued or finished) with its results: "deleted",
    "running" (cancel it first) or "missing". A compare-and-set, so a worker claiming the job
    at the same moment either wins (running) or finds no row."""
    done = session.execute(
        delete(Job).where(Job.id == job_id, Job.status != RUNNING).execution_options(synchronize_session=False)
    ).rowcount
    if done:
        return "deleted"
    return "running" if session.scalar(select(Job.status).where(Job.id == job_id)) else "missing"


def get_job(session: Session, job_id: int, *, details: bool = False) -> Job | None:
    query = select(Job).where(Job.id == job_id)
    if details:
        query = query.options(selectinload(Job.modules), selectinload(Job.metrics), selectinload(Job.artifacts))
    return session.scalars(query).unique().one_or_none()


def get_artifact(session: Session, job_id: int, format: str) -> Artifact | None:
    """The job's artifact in ``format`` (expired ones too: the caller words a 410)."""
    return session.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.format == format)).one_or_none()


_SUMMARY_COLUMNS = (
    Job.id,
    Job.status,
    Job.model,
    Job.method,
    Job.sparsity,
    Job.attempt,
    User.name.label("owner"),
    Job.created_at,
    Job.started_at,
    Job.finished_at,
    Job.error,
    Job.progress,
)


def _listing(filtered: bool) -> tuple[Select, Select]:
    """The listing's page (its rows, each with the total as a last column: one round trip) and the
    total alone (for a page past the end). Built once: a statement built per request cost more
    than running it (constructing it, then adapting the cached compiled form's result map)."""
    where = (Job.status == bindparam("status"),) if filtered else ()
    count = select(func.count()).select_from(Job).where(*where)
    page = (
        select(*_SUMMARY_COLUMNS, count.scalar_subquery().label("total"))
        .outerjoin(User, Job.owner_id == User.id)
        .where(*where)
        .order_by(Job.id.desc())
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )
    return page, count


_LISTING = {False: _listing(False), True: _listing(True)}


def list_job_summaries(
    session: Session | Connection, *, status: str | None = None, limit: int = 20, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """Newest first, as plain rows of the listing's columns (the owner's name joined): no ORM
    objects are built, which was most of what a listing cost once the JSON columns were skipped.
    A Core connection (the API's listing) skips the ORM's execution path too."""
    page, count = _LISTING[status is not None]
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if status is not None:
        params["status"] = status
    result = session.execute(page, params)
    keys = tuple(result.keys())[:-1]
    rows = result.all()
    if rows:
        return [dict(zip(keys, row, strict=False)) for row in rows], rows[0][-1]
    return [], (session.execute(count, params).scalar() or 0) if offset else 0


def discard_unsent(session: Session, *, job_id: int) -> bool:
    """The run message could not be sent: the queued row whose message never went out is
    removed, so the client's retry (with the same Idempotency-Key, or none) makes the job
    afresh. False, and nothing changed, when the message went out after all: a task id is
    recorded (the sweeper sent it) or a worker claimed the job."""
    return bool(
        session.execute(
            delete(Job)
            .where(Job.id == job_id, Job.status == QUEUED, Job.celery_task_id.is_(None))
            .execution_options(synchronize_session=False)
        ).rowcount
    )


@dataclass
class CancelOutcome:
    job: Job | None
    outcome: str  # "cancelled" (was queued), "requested" (running), "finished", "missing"


def request_cancel(session: Session, *, job_id: int) -> CancelOutcome:
    now = utcnow()
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED)
        .values(status=CANCELLED, cancel_requested=True, finished_at=now, error="cancelled before it started")
    ).rowcount
    if done:
        session.flush()
        return CancelOutcome(refresh_job(session, job_id), "cancelled")
    requested = session.execute(
        update(Job).where(Job.id == job_id, Job.status == RUNNING).values(cancel_requested=True)
    ).rowcount
    job = refresh_job(session, job_id)
    if job is None:
        return CancelOutcome(None, "missing")
    return CancelOutcome(job, "requested" if requested else "finished")


def refresh_job(session: Session, job_id: int) -> Job | None:
    return (
        session.scalars(select(Job).where(Job.id == job_id).execution_options(populate_existing=True))
        .unique()
        .one_or_none()
    )


def usage_by_user(session: Session) -> list[tuple[str | None, int, int, int]]:
    """(user name, active jobs, jobs, artifact bytes kept) per owner."""
    active = func.sum(case((Job.status.in_((QUEUED, RUNNING)), 1), else_=0))
    kept = func.sum(case((Job.artifact_expired_at.is_(None), func.coalesce(Job.artifact_size, 0)), else_=0))
    rows = session.execute(
        select(User.name, active, func.count(Job.id), kept)
        .select_from(Job)
        .outerjoin(User, User.id == Job.owner_id)
        .group_by(User.name)
        .order_by(User.name)
    )
    return [(r[0], int(r[1] or 0), int(r[2] or 0), int(r[3] or 0)) for r in rows]


# --- the dashboard's lists ----------------------------------------------------------------


def jobs_page(session: Session, *, status: str | None, limit: int, offset: int) -> tuple[list[Job], int]:
    """Newest first, with their metrics (the list shows the first perplexity)."""
    query = select(Job).options(selectinload(Job.metrics)).order_by(Job.id.desc())
    count = select(func.count()).select_from(Job)
    if status:
        query, count = query.where(Job.status == status), count.where(Job.status == status)
    items = session.scalars(query.limit(limit).offset(offset)).unique().all()
    return list(items), session.scalar(count) or 0


def status_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {status: n for status, n in rows}


def artifact_totals(session: Session) -> tuple[int, int]:
    """(artifacts kept, their bytes) of succeeded jobs."""
    row = session.execute(
        select(func.count(), func.coalesce(func.sum(Job.artifact_size), 0)).where(
            Job.artifact_path.is_not(None), Job.status == SUCCEEDED
        )
    ).one()
    return int(row[0]), int(row[1])
