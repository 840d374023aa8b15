"""Jobs: the one way each thing is done to a job, for the API and the dashboard alike.

Create (idempotency key, the per-user cap, the row, the commit, then the queue), retry, cancel,
delete, the artifact to download, the live progress, and who may change a job. Failures are
``HTTPException``s with the status and a reason a person can act on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import redis
from fastapi import HTTPException, status
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import crud, packagers, storage, streams
from app.auth import CurrentUser
from app.config import Settings
from app.job_files import JobFiles
from app.models import QUEUED, RUNNING, SUCCEEDED, TERMINAL, Artifact, Job
from app.queue import enqueue_job
from app.services.routing import consumed, listing
from app.services.specs import SpecError, check_spec
from app.workers import live_workers
from worker.engine.contract.spec import JobSpec

log = logging.getLogger(__name__)


def job_url(job_id: int) -> str:
    return f"/api/v1/jobs/{job_id}"


def waiting_note(r: redis.Redis, job: Job, default_queue: str) -> str | None:
    """For a queued job no live worker would take (its queue's workers gone), what it waits for;
    None when some live worker consumes its queue, or the workers cannot be read."""
    if job.status != QUEUED:
        return None
    queue = ((job.spec or {}).get("resources") or {}).get("queue") or default_queue
    try:
        workers = live_workers(r)
    except redis.RedisError:
        return None
    if consumed(queue, workers):
        return None
    return (
        f"no live worker takes jobs from its queue {queue!r} now (live workers: {listing(workers) or 'none'}); "
        f"it waits until one starts (sparsegpt worker --queue {queue}), or cancel it and submit it again"
    )


def live_progress(r: redis.Redis, job: Job) -> dict[str, Any] | None:
    """The latest progress: Redis has it live while the job runs, the database otherwise."""
    if job.status == RUNNING:
        try:
            raw = r.get(streams.state_key(job.id))
            if raw:
                return json.loads(raw)
        except redis.RedisError:
            pass
    return job.progress


def spec_digest(spec: JobSpec) -> str:
    """The request's spec, validated and in canonical JSON: the same body gives the same digest
    whatever its key order, spacing or omitted defaults."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def get_or_404(session: Session, job_id: int, *, details: bool = False) -> Job:
    job = crud.get_job(session, job_id, details=details)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    return job


def may_change(user: CurrentUser | None, job: Job) -> bool:
    """Only the owner or an admin cancels, retries or deletes a job (anyone in single-user mode)."""
    return user is None or user.may_manage(job.owner_id)


def forbid_unless_manager(user: CurrentUser | None, job: Job, action: str) -> None:
    if not may_change(user, job):
        owner = job.owner.name if job.owner else "nobody (its owner was removed)"
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"job {job.id} belongs to {owner}; only its owner or an admin may {action} it",
        )


# --- create ----------------------------------------------------------------------------------


@dataclass
class Created:
    job: Job
    replayed: bool = False  # an earlier request with the same Idempotency-Key made it


def _check_job_cap(session: Session, settings: Settings, user: CurrentUser) -> None:
    """Under the user's row lock (crud.lock_user), so concurrent submissions count each other."""
    cap = settings.max_active_jobs_per_user
    if cap <= 0:
        return
    active = crud.count_active_jobs(session, owner_id=user.id)
    if active >= cap:
        session.rollback()
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=(
                f"{user.name} has {active} job(s) queued or running, and this server's limit per user is {cap} "
                "(SPARSEGPT_MAX_ACTIVE_JOBS_PER_USER): wait for one to finish or cancel one"
            ),
            headers={"Retry-After": "30"},
        )


def _replayed(existing: Job, digest: str, key: str) -> Created:
    if existing.spec_sha256 != digest:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=(
                f"Idempotency-Key {key!r} was already used for job {existing.id} with a different body; "
                "send the same body to get that job again, or use a new key for a new job"
            ),
        )
    if existing.status == QUEUED and existing.celery_task_id is None:
        # The first request with this key is still sending the run message; if that fails the
        # row is removed (see _enqueue), so it must not be handed out yet. (A row whose API
        # process died here gets its message from the sweeper, and a task id with it.)
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            headers={"Retry-After": "2"},
            detail=f"an earlier request with Idempotency-Key {key!r} is still queueing its job; send this one again "
            "in a moment",
        )
    return Created(existing, replayed=True)


def create(
    session: Session,
    settings: Settings,
    user: CurrentUser,
    spec: JobSpec,
    *,
    idempotency_key: str | None = None,
    retry_of: int | None = None,
    plan_id: int | None = None,
    priority: int | None = None,
) -> Created:
    """The one way a job is made by a person (the API, its retry, the dashboard's form): the spec
    checked against the server (422 SpecError), the idempotency key's earlier job if any, then
    under the user's row lock the per-user cap (429), the row, the commit and the run message (503
    when the queue is down). ``plan_id`` / ``priority``: a retried plan job's (a plan's own jobs
    are made by app.services.plans.advance)."""
    digest = spec_digest(spec)
    if idempotency_key is not None:
        existing = crud.get_job_by_idempotency_key(session, owner_id=user.id, key=idempotency_key)
        if existing is not None:
            return _replayed(existing, digest, idempotency_key)
    checked = check_spec(spec, settings, session)
    data = checked.data
    crud.lock_user(session, user.id)
    if idempotency_key is not None:  # a twin request may have committed while we validated
        existing = crud.get_job_by_idempotency_key(session, owner_id=user.id, key=idempotency_key)
        if existing is not None:
            session.rollback()
            return _replayed(existing, digest, idempotency_key)
    _check_job_cap(session, settings, user)
    try:
        job = crud.create_job(
            session,
            spec=data,
            owner_id=user.id,
            idempotency_key=idempotency_key,
            spec_sha256=digest,
            retry_of=retry_of,
            queue=checked.queue,
        )
        if plan_id is not None or priority is not None:
            crud.mark_plan_job(session, job, plan_id=plan_id, priority=priority)
        session.commit()  # the worker must find the row: enqueue only after the commit
    except IntegrityError:  # the twin committed between our check and our insert
        session.rollback()
        existing = crud.get_job_by_idempotency_key(session, owner_id=user.id, key=idempotency_key or "")
        if existing is None:
            raise
        return _replayed(existing, digest, idempotency_key or "")
    _enqueue(session, settings, job.id, queue=checked.queue, priority=priority)
    return Created(crud.get_job(session, job.id, details=True))


def _enqueue(
    session: Session, settings: Settings, job_id: int, *, queue: str | None = None, priority: int | None = None
) -> None:
    """Send the run message for a committed row (with the job's message priority). When Redis is
    down the row is taken back (its message never went out, so no worker has it) and the answer is
    503: the client's retry, with the same Idempotency-Key or without one, makes the job afresh,
    and it runs once."""
    try:
        task_id = enqueue_job(settings, job_id, queue=queue, priority=priority)
    except Exception as err:  # kombu/redis connection errors
        log.warning("could not enqueue job %s: %s", job_id, err)
        taken_back = crud.discard_unsent(session, job_id=job_id)
        session.commit()
        if taken_back:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": "5"},
                detail="the job queue (Redis) is unreachable; nothing was queued, try again",
            ) from None
        return  # the message went out after all (the sweeper sent it, or a worker has it): the job stands
    crud.set_task_id(session, job_id=job_id, task_id=task_id)
    session.commit()


def retry(session: Session, settings: Settings, user: CurrentUser, job_id: int) -> Job:
    """A new job with the same spec, checked again against today's limits; the old one stays. A
    plan's job stays in its plan (and its message priority): the plan's point names the new job."""
    old = get_or_404(session, job_id)
    forbid_unless_manager(user, old, "retry")
    if old.status not in TERMINAL:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"job {job_id} is {old.status}; retry it once it has finished (or cancel it)",
        )
    try:
        spec = JobSpec.model_validate(old.spec)
    except ValidationError as err:  # a spec stored by an older version
        raise SpecError([{**e, "loc": ["body", *e["loc"]]} for e in err.errors(include_input=False)]) from None
    return create(session, settings, user, spec, retry_of=old.id, plan_id=old.plan_id, priority=old.priority).job


# --- cancel and delete -------------------------------------------------------------------------


def cancel(
    session: Session, settings: Settings, r: redis.Redis, user: CurrentUser | None, job_id: int
) -> crud.CancelOutcome:
    """404 / 403 unless the user may cancel the job; then the database first (a queued job ends
    now, a running one is flagged), then Redis: the worker's fast cancel flag, or the final
    status event for SSE clients. Redis being down only delays what the database says. The
    outcome "finished" (it had already ended) is for the caller to word."""
    forbid_unless_manager(user, get_or_404(session, job_id), "cancel")
    result = crud.request_cancel(session, job_id=job_id)
    session.commit()
    if result.outcome == "missing":  # deleted since it was read
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    try:
        if result.outcome == "requested":
            r.set(streams.cancel_key(job_id), "1", ex=settings.job_time_limit_s)
        elif result.outcome == "cancelled":
            streams.publish(
                r,
                job_id,
                "status",
                {"status": "cancelled", "attempt": result.job.attempt, "error": result.job.error},
                maxlen=settings.events_maxlen,
                ttl_s=settings.events_ttl_s,
            )
    except redis.RedisError:
        log.warning("Redis unreachable while cancelling job %s; the database flag stands", job_id)
    return result


def delete(session: Session, settings: Settings, r: redis.Redis, user: CurrentUser, job_id: int) -> None:
    """Remove a queued or finished job: its row, results, events and artifact files."""
    forbid_unless_manager(user, get_or_404(session, job_id), "delete")
    outcome = crud.delete_job(session, job_id=job_id)
    if outcome == "running":
        session.rollback()
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"job {job_id} is running; cancel it first (POST {job_url(job_id)}/cancel)"
        )
    if outcome == "missing":
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    session.commit()
    remove_artifact_files(settings, job_id)
    try:
        r.delete(streams.stream_key(job_id), streams.state_key(job_id), streams.cancel_key(job_id))
    except redis.RedisError:
        log.warning("Redis unreachable while deleting job %s's events; they expire on their own", job_id)


def remove_artifact_files(settings: Settings, job_id: int) -> None:
    """Every file of the job: its directory under the artifacts dir and its objects in the store."""
    JobFiles(settings, job_id).delete_all()


# --- the artifacts -------------------------------------------------------------------------------


def available_artifacts(job: Job, settings: Settings) -> list[Artifact]:
    """The job's artifacts still on this server (cheap: no request to a remote store), default first."""
    if job.status != SUCCEEDED or job.artifact_expired_at is not None:
        return []
    store = storage.get_store(settings)
    return [a for a in job.artifacts if a.expired_at is None and store.holds(a.path)]


def artifact_available(job: Job, settings: Settings) -> bool:
    """The job succeeded and its files are still on this server."""
    return bool(available_artifacts(job, settings))


@dataclass
class Download:
    job: Job
    artifact: Artifact
    packager: packagers.Packager
    store: storage.Store
    name: str  # the archive's top directory / the file name's stem

    @property
    def file_name(self) -> str:
        return self.packager.file_name(self.name)

    def body(self, start: int = 0, end: int | None = None):
        """The bytes [start, end); the whole object is checked against its recorded sha256 as it
        goes out (see ``storage.verified``); a range cannot be, and is sent as read."""
        chunks = self.store.read(self.artifact.path, self.packager, self.name, start, end)
        if start == 0 and end in (None, self.artifact.size):
            return storage.verified(
                chunks,
                self.artifact.sha256,
                f"job {self.artifact.job_id}'s {self.artifact.format} artifact ({self.artifact.path})",
            )
        return chunks


def artifact(session: Session, settings: Settings, job_id: int, format: str | None = None) -> Download:
    """The job's artifact in ``format`` (None: the default) ready to stream; or 404 (no such job
    or format), 409 (not succeeded), 410 (gone), 503 (the store unreachable)."""
    job = get_or_404(session, job_id)
    if job.status != SUCCEEDED:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"job {job_id} is {job.status}; the artifact exists once it has succeeded"
        )
    if job.artifact_expired_at is not None:
        raise HTTPException(
            status.HTTP_410_GONE,
            detail=f"job {job_id}'s artifact was deleted on {job.artifact_expired_at:%Y-%m-%d %H:%M} UTC "
            f"(artifacts are kept {settings.artifact_retention_s / 86400:g} days); "
            "retry the job to make it again",
        )
    wanted = format or packagers.default_for(job.spec)  # a quantizing job's: compressed-tensors
    row = crud.get_artifact(session, job_id, wanted)
    if row is None and wanted == packagers.DEFAULT_FORMAT and job.artifact_path and job.artifact_sha256:
        # recorded by a worker of the version before artifact rows (a rolling upgrade): the same tar
        row = Artifact(
            job_id=job.id,
            format=wanted,
            media_type=packagers.HfTar.media_type,
            path=job.artifact_path,
            size=job.artifact_size or 0,
            sha256=job.artifact_sha256,
        )
    packager = packagers.get(wanted)
    if row is None or packager is None:
        made = ", ".join(a.format for a in crud.get_job(session, job_id, details=True).artifacts) or "none"
        raise HTTPException(
            status.HTTP_404_NOT_FOUND if format else status.HTTP_410_GONE,
            detail=f"job {job_id} has no artifact in the format {wanted!r} (it has: {made})",
        )
    store = storage.get_store(settings)
    try:
        intact = store.holds(row.path) and store.intact(row.path, row.size)
    except storage.StorageError as err:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "10"},
            detail=f"the object store is unreachable: {err}",
        ) from None
    if row.expired_at is not None or not intact:
        raise HTTPException(status.HTTP_410_GONE, detail=f"job {job_id}'s artifact is no longer {store.place}")
    return Download(job, row, packager, store, JobFiles(settings, job_id, store).name)
