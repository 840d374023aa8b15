"""Jobs: submit, list, read, cancel, download the artifact."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Header, HTTPException, Path as PathParam, Query, Response, status
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import archive, crud, events
from app.api.deps import RedisDep, SessionDep, SettingsDep
from app.auth import CurrentUser, UserDep
from app.config import Settings
from app.models import RUNNING, SUCCEEDED, TERMINAL, Job
from app.queue import enqueue_job
from app.schemas import ArtifactOut, JobList, JobOut, JobSpec, JobStatus, JobSummary, MetricOut, ModuleResultOut
from app.validation import SpecError, check_spec

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])

NOT_FOUND = {404: {"description": "no such job"}}
FORBIDDEN = {403: {"description": "only the job's owner or an admin may do this"}}
LIMITED = {429: {"description": "the per-user cap on queued + running jobs is reached"}}
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
JobId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="the job's id")]


def job_url(job_id: int) -> str:
    return f"/api/v1/jobs/{job_id}"


def live_progress(r: redis.Redis, job: Job) -> dict[str, Any] | None:
    """The latest progress: Redis has it live while the job runs, the database otherwise."""
    if job.status == RUNNING:
        try:
            raw = r.get(events.state_key(job.id))
            if raw:
                return json.loads(raw)
        except redis.RedisError:
            pass
    return job.progress


def summary(job: Job, progress: dict[str, Any] | None = None) -> dict[str, Any]:
    return dict(
        id=job.id,
        status=job.status,
        model=job.model,
        method=job.method,
        sparsity=job.sparsity,
        attempt=job.attempt,
        owner=job.owner.name if job.owner else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
        progress=progress if progress is not None else job.progress,
        url=job_url(job.id),
    )


def job_out(job: Job, progress: dict[str, Any] | None = None, *, retention_s: int = 0) -> JobOut:
    artifact = None
    if job.status == SUCCEEDED and job.artifact_sha256 and job.artifact_size is not None and job.artifact_expired_at is None:
        expires = job.finished_at + timedelta(seconds=retention_s) if retention_s > 0 and job.finished_at else None
        artifact = ArtifactOut(url=f"{job_url(job.id)}/artifact", size=job.artifact_size, sha256=job.artifact_sha256,
                               expires_at=expires)
    return JobOut(
        **summary(job, progress),
        spec=job.spec,
        cancel_requested=job.cancel_requested,
        heartbeat_at=job.heartbeat_at,
        worker=job.worker,
        result=job.result,
        metrics=[MetricOut.model_validate(m) for m in job.metrics],
        modules=[ModuleResultOut.model_validate(m) for m in job.modules],
        artifact=artifact,
        artifact_expired_at=job.artifact_expired_at,
        retry_of=job.retry_of,
        events_url=f"{job_url(job.id)}/events",
    )


def spec_digest(spec: JobSpec) -> str:
    """The request's spec, validated and in canonical JSON: the same body gives the same digest
    whatever its key order, spacing or omitted defaults."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _forbid_unless_manager(user: CurrentUser, job: Job, action: str) -> None:
    if not user.may_manage(job.owner_id):
        owner = job.owner.name if job.owner else "nobody (its owner was removed)"
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"job {job.id} belongs to {owner}; only its owner or an admin may {action} it",
        )


def check_job_cap(session: Session, settings: Settings, user: CurrentUser) -> None:
    """Under the user's row lock (crud.lock_user), so concurrent submissions count each other."""
    cap = settings.max_active_jobs_per_user
    if cap <= 0:
        return
    active = crud.count_active_jobs(session, owner_id=user.id)
    if active >= cap:
        session.rollback()
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=(f"{user.name} has {active} job(s) queued or running, and this server's limit per user is {cap} "
                    "(SPARSEGPT_MAX_ACTIVE_JOBS_PER_USER): wait for one to finish or cancel one"),
            headers={"Retry-After": "30"},
        )


def create_for_user(
    session: Session, settings: Settings, user: CurrentUser, data: dict[str, Any], *,
    spec_sha256: str | None = None, retry_of: int | None = None,
) -> Job:
    """The one way a job is made for a person (the API, its retry, and the dashboard's form):
    under the user's row lock, the per-user cap (HTTPException 429), the row, the commit, the
    run message (HTTPException 503 when Redis is down). ``data`` is ``check_spec``'s output."""
    crud.lock_user(session, user.id)
    check_job_cap(session, settings, user)
    job = crud.create_job(session, spec=data, owner_id=user.id, spec_sha256=spec_sha256, retry_of=retry_of)
    session.commit()  # the worker must find the row: enqueue only after the commit
    _enqueue(session, settings, job.id)
    return crud.get_job(session, job.id, details=True)


def _enqueue(session: Session, settings: Settings, job_id: int) -> None:
    """Send the run message for a committed row; 503 (and the job failed) when Redis is down."""
    try:
        task_id = enqueue_job(settings, job_id)
    except Exception as err:  # kombu/redis connection errors
        log.exception("could not enqueue job %s", job_id)
        crud.fail_unqueued(session, job_id=job_id, error=f"could not be queued: the broker is unreachable ({err})")
        session.commit()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="the job queue (Redis) is unreachable; try again") from None
    crud.set_task_id(session, job_id=job_id, task_id=task_id)
    session.commit()


def _replay(existing: Job, digest: str, key: str, settings: Settings) -> JSONResponse:
    if existing.spec_sha256 != digest:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=(f"Idempotency-Key {key!r} was already used for job {existing.id} with a different body; "
                    "send the same body to get that job again, or use a new key for a new job"),
        )
    body = job_out(existing, retention_s=settings.artifact_retention_s).model_dump(mode="json")
    return JSONResponse(body, status_code=status.HTTP_200_OK,
                        headers={"Location": job_url(existing.id), "Idempotent-Replayed": "true"})


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "the job an earlier request with this Idempotency-Key made"},
        422: {"description": "invalid spec, or an Idempotency-Key reused with another body"},
        **LIMITED,
        503: {"description": "the queue is unreachable"},
    },
)
def submit_job(
    spec: JobSpec,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    user: UserDep,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", max_length=255,
               description="repeat a POST safely: the same key and body return the first job (200)"),
    ] = None,
) -> Any:
    """Queue a pruning job. 201 with the job and its Location."""
    digest = spec_digest(spec)
    if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            detail="Idempotency-Key: 1 to 255 visible ASCII characters (a UUID, for example)")
    if idempotency_key is not None:
        existing = crud.get_job_by_idempotency_key(session, owner_id=user.id, key=idempotency_key)
        if existing is not None:
            return _replay(existing, digest, idempotency_key, settings)
    try:
        data = check_spec(spec, settings, session)
    except SpecError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=err.errors) from None
    crud.lock_user(session, user.id)
    if idempotency_key is not None:  # a twin request may have committed while we validated
        existing = crud.get_job_by_idempotency_key(session, owner_id=user.id, key=idempotency_key)
        if existing is not None:
            session.rollback()
            return _replay(existing, digest, idempotency_key, settings)
    check_job_cap(session, settings, user)
    try:
        job = crud.create_job(session, spec=data, owner_id=user.id, idempotency_key=idempotency_key, spec_sha256=digest)
        session.commit()  # the worker must find the row: enqueue only after the commit
    except IntegrityError:
        session.rollback()
        existing = crud.get_job_by_idempotency_key(session, owner_id=user.id, key=idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, digest, idempotency_key, settings)
    _enqueue(session, settings, job.id)
    job = crud.get_job(session, job.id, details=True)
    response.headers["Location"] = job_url(job.id)
    return job_out(job, retention_s=settings.artifact_retention_s)


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    status_: Annotated[JobStatus | None, Query(alias="status", description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> JobList:
    """Newest first."""
    items, total = crud.list_jobs(session, status=status_, limit=limit, offset=offset)
    return JobList(items=[JobSummary(**summary(j)) for j in items], total=total, limit=limit, offset=offset)


def _job_or_404(session, job_id: int, *, details: bool = False) -> Job:
    job = crud.get_job(session, job_id, details=details)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    return job



@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND)
def get_job(job_id: JobId, session: SessionDep, r: RedisDep, settings: SettingsDep) -> JobOut:
    job = _job_or_404(session, job_id, details=True)
    return job_out(job, live_progress(r, job), retention_s=settings.artifact_retention_s)


@router.post(
    "/{job_id}/retry",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    responses={**NOT_FOUND, **FORBIDDEN, 409: {"description": "the job has not finished"},
               422: {"description": "its spec is no longer allowed here"}, **LIMITED, 503: {"description": "the queue is unreachable"}},
)
def retry_job(job_id: JobId, response: Response, session: SessionDep, settings: SettingsDep, user: UserDep) -> JobOut:
    """A new job with the same spec (checked again against today's limits); the old one stays."""
    old = _job_or_404(session, job_id)
    _forbid_unless_manager(user, old, "retry")
    if old.status not in TERMINAL:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job {job_id} is {old.status}; retry it once it has finished (or cancel it)")
    try:
        spec = JobSpec.model_validate(old.spec)
        data = check_spec(spec, settings, session)
    except SpecError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=err.errors) from None
    except ValueError as err:  # pydantic's ValidationError: a spec stored by an older version
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"job {job_id}'s spec is no longer valid: {err}") from None
    job = create_for_user(session, settings, user, data, spec_sha256=spec_digest(spec), retry_of=old.id)
    response.headers["Location"] = job_url(job.id)
    return job_out(job, retention_s=settings.artifact_retention_s)


def remove_artifact_files(settings: Settings, job_id: int) -> None:
    """The job's directory under the artifacts dir: named by the job id, never by input."""
    root = settings.artifacts_dir.resolve()
    target = (root / str(int(job_id))).resolve()
    if target.parent == root:
        shutil.rmtree(target, ignore_errors=True)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={**NOT_FOUND, **FORBIDDEN, 409: {"description": "running: cancel it first"}},
)
def delete_job(job_id: JobId, session: SessionDep, settings: SettingsDep, r: RedisDep, user: UserDep) -> Response:
    """Remove a queued or finished job: its row, results, events and artifact files."""
    job = _job_or_404(session, job_id)
    _forbid_unless_manager(user, job, "delete")
    outcome = crud.delete_job(session, job_id=job_id)
    if outcome == "running":
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job {job_id} is running; cancel it first (POST {job_url(job_id)}/cancel)")
    if outcome == "missing":
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    session.commit()
    remove_artifact_files(settings, job_id)
    try:
        r.delete(events.stream_key(job_id), events.state_key(job_id), events.cancel_key(job_id))
    except redis.RedisError:
        log.warning("Redis unreachable while deleting job %s's events; they expire on their own", job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def request_cancel(session: Session, settings: Settings, r: redis.Redis, job_id: int):
    """The one way a job is cancelled (the API and the dashboard): the database first (a queued
    job ends now, a running one is flagged), then Redis: the worker's fast cancel flag, or the
    final status event for SSE clients. Redis being down only delays what the database says."""
    result = crud.request_cancel(session, job_id=job_id)
    session.commit()
    try:
        if result.outcome == "requested":
            r.set(events.cancel_key(job_id), "1", ex=settings.job_time_limit_s)
        elif result.outcome == "cancelled":
            events.publish(
                r, job_id, "status", {"status": "cancelled", "attempt": result.job.attempt, "error": result.job.error},
                maxlen=settings.events_maxlen, ttl_s=settings.events_ttl_s,
            )
    except redis.RedisError:
        log.warning("Redis unreachable while cancelling job %s; the database flag stands", job_id)
    return result


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses={**NOT_FOUND, **FORBIDDEN, 202: {"model": JobOut, "description": "running: it stops between modules"},
               409: {"description": "already finished"}},
)
def cancel_job(job_id: JobId, session: SessionDep, settings: SettingsDep, r: RedisDep, user: UserDep) -> Response:
    """A queued job is cancelled at once (200); a running one is asked to stop (202) and ends
    `cancelled` between modules, leaving no partial artifact."""
    _forbid_unless_manager(user, _job_or_404(session, job_id), "cancel")
    result = request_cancel(session, settings, r, job_id)
    if result.outcome == "missing":
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    if result.outcome == "finished":
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job {job_id} is already {result.job.status}")
    job = crud.get_job(session, job_id, details=True)
    code = status.HTTP_202_ACCEPTED if result.outcome == "requested" else status.HTTP_200_OK
    return JSONResponse(job_out(job, retention_s=settings.artifact_retention_s).model_dump(mode="json"), status_code=code)


@router.get(
    "/{job_id}/artifact",
    response_class=StreamingResponse,
    responses={
        **NOT_FOUND,
        200: {"content": {archive.MEDIA_TYPE: {}}, "description": "the pruned model directory as a tar archive"},
        409: {"description": "the job has not succeeded"},
        410: {"description": "the artifact was removed"},
    },
)
def download_artifact(job_id: JobId, session: SessionDep, settings: SettingsDep) -> StreamingResponse:
    """The pruned Hugging Face directory as one tar stream; its sha256 is in the
    X-Checksum-SHA256 and Repr-Digest headers and in the job."""
    job = _job_or_404(session, job_id)
    if job.status != SUCCEEDED:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job {job_id} is {job.status}; the artifact exists once it has succeeded")
    if job.artifact_expired_at is not None:
        raise HTTPException(
            status.HTTP_410_GONE,
            detail=f"job {job_id}'s artifact was deleted on {job.artifact_expired_at:%Y-%m-%d %H:%M} UTC "
                   f"(artifacts are kept {settings.artifact_retention_s / 86400:g} days); retry the job to make it again",
        )
    root = Path(job.artifact_path or "")
    # The path is the worker's, under the artifacts directory; never one a request named.
    inside = root.resolve().is_relative_to(settings.artifacts_dir.resolve()) if job.artifact_path else False
    if not job.artifact_path or not inside or not root.is_dir() or not job.artifact_sha256:
        raise HTTPException(status.HTTP_410_GONE, detail=f"job {job_id}'s artifact is no longer on the server")
    name = archive.artifact_name(job_id)
    digest_b64 = base64.b64encode(bytes.fromhex(job.artifact_sha256)).decode()
    headers = {
        "Content-Disposition": f'attachment; filename="{name}.tar"',
        "Content-Length": str(job.artifact_size),
        "X-Checksum-SHA256": job.artifact_sha256,
        "Repr-Digest": f"sha-256=:{digest_b64}:",
        "ETag": f'"{job.artifact_sha256}"',
    }
    return StreamingResponse(archive.iter_tar(root, name), media_type=archive.MEDIA_TYPE, headers=headers)
