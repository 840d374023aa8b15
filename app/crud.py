"""Every query and state transition. Transitions are compare-and-set UPDATEs on the job row,
so two processes can never both move a job (a redelivered message, a late cancel)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.orm import Session, selectinload

from app.models import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    TERMINAL,
    CalibrationSet,
    Job,
    Metric,
    ModuleResult,
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
        retry_of=retry_of,
    )
    session.add(job)
    session.flush()
    return job


def set_task_id(session: Session, *, job_id: int, task_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(celery_task_id=task_id, enqueued_at=utcnow()))


def get_job_by_idempotency_key(session: Session, *, owner_id: int, key: str) -> Job | None:
    return session.scalars(
        select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key)
    ).unique().one_or_none()


def lock_user(session: Session, user_id: int) -> None:
    """Serialize one user's submissions until the transaction ends: a no-op UPDATE takes the
    row lock on PostgreSQL and the write lock on SQLite, so two requests cannot both pass the cap."""
    session.execute(update(User).where(User.id == user_id).values(is_admin=User.is_admin))


def count_active_jobs(session: Session, *, owner_id: int) -> int:
    return session.scalar(
        select(func.count()).select_from(Job).where(Job.owner_id == owner_id, Job.status.in_((QUEUED, RUNNING)))
    ) or 0


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
        query = query.options(selectinload(Job.modules), selectinload(Job.metrics))
    return session.scalars(query).unique().one_or_none()


def list_jobs(
    session: Session, *, status: str | None = None, limit: int = 20, offset: int = 0
) -> tuple[list[Job], int]:
    """Newest first."""
    query = select(Job)
    count = select(func.count()).select_from(Job)
    if status is not None:
        query = query.where(Job.status == status)
        count = count.where(Job.status == status)
    items = session.scalars(query.order_by(Job.id.desc()).limit(limit).offset(offset)).unique().all()
    return list(items), session.scalar(count) or 0


def fail_unqueued(session: Session, *, job_id: int, error: str) -> None:
    """The run message could not be sent: the queued job fails with the reason."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED)
        .values(status=FAILED, error=error, finished_at=utcnow())
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
        return CancelOutcome(_refresh(session, job_id), "cancelled")
    requested = session.execute(
        update(Job).where(Job.id == job_id, Job.status == RUNNING).values(cancel_requested=True)
    ).rowcount
    job = _refresh(session, job_id)
    if job is None:
        return CancelOutcome(None, "missing")
    return CancelOutcome(job, "requested" if requested else "finished")


def _refresh(session: Session, job_id: int) -> Job | None:
    return session.scalars(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    ).unique().one_or_none()


# --- jobs: the worker side ----------------------------------------------------------------


@dataclass
class Claim:
    claimed: bool
    job: Job | None
    reason: str = ""


def claim_job(
    session: Session,
    *,
    job_id: int,
    worker: str,
    pid: int,
    stale_before: datetime,
    max_attempts: int,
    owner_is_dead: Callable[[str | None, int | None], bool] = lambda worker, pid: False,
) -> Claim:
    """queued -> running (attempt + 1). A job already running is taken over only when its
    heartbeat is older than ``stale_before`` or ``owner_is_dead`` says its process is gone
    (a worker killed mid-job); past ``max_attempts`` it fails instead. Finished jobs and
    jobs running elsewhere are left alone: a redelivered message then does nothing."""
    now = utcnow()
    values = dict(
        status=RUNNING,
        attempt=Job.attempt + 1,
        started_at=now,
        heartbeat_at=now,
        worker=worker,
        worker_pid=pid,
        error=None,
        progress=None,
    )
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED, Job.attempt < max_attempts)
        .values(**values)
    ).rowcount
    if claimed:
        return Claim(True, _refresh(session, job_id))
    job = _refresh(session, job_id)
    if job is None:
        return Claim(False, None, "no such job")
    if job.status in TERMINAL:
        return Claim(False, job, f"job is already {job.status}")
    stale = job.heartbeat_at is None or job.heartbeat_at < stale_before
    if job.status == RUNNING and not (stale or owner_is_dead(job.worker, job.worker_pid)):
        return Claim(False, job, f"job is running on {job.worker} (pid {job.worker_pid})")
    seen = (Job.id == job_id, Job.status == job.status, Job.attempt == job.attempt)
    if job.attempt >= max_attempts:
        reason = (
            f"gave up after {job.attempt} attempt(s): the worker running it stopped "
            f"(killed, out of memory, or lost) every time (attempt limit {max_attempts})"
        )
        session.execute(update(Job).where(*seen).values(status=FAILED, error=reason, finished_at=now))
        return Claim(False, _refresh(session, job_id), reason)
    claimed = session.execute(update(Job).where(*seen).values(**values)).rowcount
    if not claimed:
        return Claim(False, _refresh(session, job_id), "another worker claimed it first")
    return Claim(True, _refresh(session, job_id))


def heartbeat(
    session: Session, *, job_id: int, attempt: int, progress: dict[str, Any] | None = None
) -> tuple[bool, bool]:
    """Refresh this run's heartbeat (and progress snapshot). Returns (still ours, cancel requested)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    ours = session.execute(
        update(Job).where(Job.id == job_id, Job.status == RUNNING, Job.attempt == attempt).values(**values)
    ).rowcount
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return bool(ours), bool(cancel)


def finish_job(
    session: Session,
    *,
    job_id: int,
    attempt: int,
    status: str,
    error: str | None = None,
    result: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
    modules: Iterable[dict[str, Any]] = (),
    metrics: Iterable[dict[str, Any]] = (),
    artifact: tuple[str, int, str] | None = None,
) -> bool:
    """running -> ``status`` for this attempt only; results are written in the same transaction."""
    values: dict[str, Any] = dict(status=status, error=error, finished_at=utcnow(), result=result)
    if progress is not None:
        values["progress"] = progress
    if artifact is not None:
        values.update(artifact_path=artifact[0], artifact_size=artifact[1], artifact_sha256=artifact[2])
    done = session.execute(
        update(Job).where(Job.id == job_id, Job.status == RUNNING, Job.attempt == attempt).values(**values)
    ).rowcount
    if not done:
        return False
    session.add_all(ModuleResult(job_id=job_id, **m) for m in modules)
    session.add_all(Metric(job_id=job_id, **m) for m in metrics)
    session.flush()
    return True


def running_jobs_with_stale_heartbeat(session: Session, *, stale_before: datetime) -> list[Job]:
    return list(
        session.scalars(
            select(Job).where(Job.status == RUNNING, (Job.heartbeat_at < stale_before) | Job.heartbeat_at.is_(None))
        ).unique()
    )


def release_stale(session: Session, job: Job, *, max_attempts: int, stale_before: datetime, task_id: str) -> str | None:
    """A running job whose heartbeat expired: back to queued with a new run message id
    (returns "requeued"), or failed past the attempt limit / cancelled if a cancel was asked
    ("failed", "cancelled"). Compare-and-set on (status, attempt, heartbeat) as read: None when
    another process (a sweeper elsewhere, the worker's own heartbeat) moved it first."""
    now = utcnow()
    seen = (
        Job.id == job.id,
        Job.status == RUNNING,
        Job.attempt == job.attempt,
        (Job.heartbeat_at < stale_before) | Job.heartbeat_at.is_(None),
    )
    last = job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at else "never"
    if job.cancel_requested:
        values = dict(status=CANCELLED, finished_at=now, error="cancelled (its worker stopped while it was cancelling)")
        outcome = "cancelled"
    elif job.attempt >= max_attempts:
        values = dict(
            status=FAILED, finished_at=now,
            error=(f"gave up after {job.attempt} attempt(s): the worker running it ({job.worker or 'unknown'}) "
                   f"stopped sending heartbeats (last at {last}) and the attempt limit is {max_attempts}"),
        )
        outcome = "failed"
    else:
        values = dict(status=QUEUED, celery_task_id=task_id, enqueued_at=now, worker=None, worker_pid=None,
                      error=f"requeued: the worker of attempt {job.attempt} ({job.worker or 'unknown'}) stopped "
                            f"sending heartbeats (last at {last})")
        outcome = "requeued"
    done = session.execute(update(Job).where(*seen).values(**values)).rowcount
    return outcome if done else None


def queued_jobs_sent_before(session: Session, *, before: datetime, limit: int = 500) -> list[tuple[int, str | None]]:
    """(id, task id) of queued jobs whose run message was sent before ``before`` (or never)."""
    rows = session.execute(
        select(Job.id, Job.celery_task_id)
        .where(
            Job.status == QUEUED,
            (Job.enqueued_at < before) | (Job.enqueued_at.is_(None) & (Job.created_at < before)),
        )
        .order_by(Job.id)
        .limit(limit)
    )
    return [(row[0], row[1]) for row in rows]


def replace_task_id(session: Session, *, job_id: int, old: str | None, new: str) -> bool:
    """Compare-and-set: only one process re-sends a lost message."""
    cond = Job.celery_task_id.is_(None) if old is None else Job.celery_task_id == old
    return bool(
        session.execute(
            update(Job).where(Job.id == job_id, Job.status == QUEUED, cond).values(celery_task_id=new, enqueued_at=utcnow())
        ).rowcount
    )


def artifacts_to_expire(session: Session, *, finished_before: datetime, limit: int = 200) -> list[Job]:
    return list(
        session.scalars(
            select(Job)
            .where(Job.artifact_path.is_not(None), Job.artifact_expired_at.is_(None), Job.finished_at < finished_before)
            .order_by(Job.id)
            .limit(limit)
        ).unique()
    )


def mark_artifact_expired(session: Session, *, job_id: int) -> bool:
    return bool(
        session.execute(
            update(Job).where(Job.id == job_id, Job.artifact_expired_at.is_(None)).values(artifact_expired_at=utcnow())
        ).rowcount
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


def stale_before(timeout_s: float) -> datetime:
    return utcnow() - timedelta(seconds=timeout_s)


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
