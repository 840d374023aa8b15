"""A job's life on the worker side and the sweeper's: claim (compare-and-set), heartbeat,
finish, and the queries that find lost jobs and expired artifacts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.archive import MEDIA_TYPE
from app.crud.jobs import refresh_job
from app.models import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    TERMINAL,
    Artifact,
    Job,
    Metric,
    ModuleResult,
    utcnow,
)
from app.packagers import DEFAULT_FORMAT

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
    jobs running elsewhere are left alone: a redelivered message then does nothing. The heartbeat
    is stamped with the database's clock (``db_now``), as every heartbeat is."""
    now = db_now(session)
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
        update(Job).where(Job.id == job_id, Job.status == QUEUED, Job.attempt < max_attempts).values(**values)
    ).rowcount
    if claimed:
        return Claim(True, refresh_job(session, job_id))
    job = refresh_job(session, job_id)
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
        return Claim(False, refresh_job(session, job_id), reason)
    claimed = session.execute(update(Job).where(*seen).values(**values)).rowcount
    if not claimed:
        return Claim(False, refresh_job(session, job_id), "another worker claimed it first")
    return Claim(True, refresh_job(session, job_id))


def heartbeat(
    session: Session, *, job_id: int, attempt: int, progress: dict[str, Any] | None = None
) -> tuple[bool, bool]:
    """Refresh this run's heartbeat (and progress snapshot), stamped with the database's clock (the
    sweeper compares with the same clock: the worker's own is never used). Returns (still ours,
    cancel requested)."""
    values: dict[str, Any] = {"heartbeat_at": db_now(session)}
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
    artifacts: Iterable[dict[str, Any]] | None = None,
) -> bool:
    """running -> ``status`` for this attempt only; results are written in the same transaction.
    ``artifacts``: one row per format (format, media_type, path, size, sha256), the first being the
    default one, which the job's artifact_* columns repeat; ``artifact`` (path, size, sha256) alone
    is the default format's."""
    values: dict[str, Any] = dict(status=status, error=error, finished_at=utcnow(), result=result)
    if progress is not None:
        values["progress"] = progress
    if artifacts is None and artifact is not None:
        artifacts = [
            dict(format=DEFAULT_FORMAT, media_type=MEDIA_TYPE, path=artifact[0], size=artifact[1], sha256=artifact[2])
        ]
    artifacts = list(artifacts or ())
    if artifacts:
        first = artifacts[0]
        values.update(artifact_path=first["path"], artifact_size=first["size"], artifact_sha256=first["sha256"])
    done = session.execute(
        update(Job).where(Job.id == job_id, Job.status == RUNNING, Job.attempt == attempt).values(**values)
    ).rowcount
    if not done:
        return False
    session.add_all(ModuleResult(job_id=job_id, **m) for m in modules)
    session.add_all(Metric(job_id=job_id, **m) for m in metrics)
    session.add_all(Artifact(job_id=job_id, **a) for a in artifacts)
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
            status=FAILED,
            finished_at=now,
            error=(
                f"gave up after {job.attempt} attempt(s): the worker running it ({job.worker or 'unknown'}) "
                f"stopped sending heartbeats (last at {last}) and the attempt limit is {max_attempts}"
            ),
        )
        outcome = "failed"
    else:
        values = dict(
            status=QUEUED,
            celery_task_id=task_id,
            enqueued_at=now,
            worker=None,
            worker_pid=None,
            error=f"requeued: the worker of attempt {job.attempt} ({job.worker or 'unknown'}) stopped "
            f"sending heartbeats (last at {last})",
        )
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


def job_routes(session: Session, job_ids: list[int], *, default: str) -> dict[int, tuple[str, int | None]]:
    """{id: (the queue it was routed to, else ``default``; its message priority)} in one query."""
    found: dict[int, tuple[str, int | None]] = {job_id: (default, None) for job_id in job_ids}
    for job_id, queue, priority in session.execute(select(Job.id, Job.queue, Job.priority).where(Job.id.in_(job_ids))):
        found[job_id] = (queue or default, priority)
    return found


def replace_task_id(session: Session, *, job_id: int, old: str | None, new: str) -> bool:
    """Compare-and-set: only one process re-sends a lost message."""
    cond = Job.celery_task_id.is_(None) if old is None else Job.celery_task_id == old
    return bool(
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == QUEUED, cond)
            .values(celery_task_id=new, enqueued_at=utcnow())
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
    """The job's artifacts, every format, marked removed (a compare-and-set: one sweeper wins)."""
    now = utcnow()
    won = bool(
        session.execute(
            update(Job).where(Job.id == job_id, Job.artifact_expired_at.is_(None)).values(artifact_expired_at=now)
        ).rowcount
    )
    if won:
        session.execute(
            update(Artifact).where(Artifact.job_id == job_id, Artifact.expired_at.is_(None)).values(expired_at=now)
        )
    return won


def stale_before(timeout_s: float, session: Session | None = None) -> datetime:
    """The heartbeat age limit: ``timeout_s`` before the database's clock (``session`` given: what
    heartbeats are compared with), else before this machine's."""
    return (db_now(session) if session is not None else utcnow()) - timedelta(seconds=timeout_s)


def db_now(session: Session) -> datetime:
    """The database server's clock now (aware UTC). Heartbeats are stamped and compared with it, so
    two machines' clocks are never compared (a worker 60 s behind the sweeper had every job requeued).
    SQLite's is this machine's (the file is local); PostgreSQL's is the server's now()."""
    if session.get_bind().dialect.name == "sqlite":
        text = session.scalar(select(func.strftime("%Y-%m-%d %H:%M:%f", "now")))
        return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)
    return session.scalar(select(func.now())).astimezone(timezone.utc)
