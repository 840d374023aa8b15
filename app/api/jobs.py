"""Jobs: submit, list, read, cancel, download the artifact."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import APIRouter, HTTPException, Path as PathParam, Query, Response, status
from fastapi.responses import JSONResponse, StreamingResponse

from app import archive, crud, events
from app.api.deps import RedisDep, SessionDep, SettingsDep
from app.models import RUNNING, SUCCEEDED, Job
from app.queue import enqueue_job
from app.schemas import ArtifactOut, JobList, JobOut, JobSpec, JobStatus, JobSummary, MetricOut, ModuleResultOut
from app.validation import SpecError, check_spec

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])

NOT_FOUND = {404: {"description": "no such job"}}
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


def job_out(job: Job, progress: dict[str, Any] | None = None) -> JobOut:
    artifact = None
    if job.status == SUCCEEDED and job.artifact_sha256 and job.artifact_size is not None:
        artifact = ArtifactOut(url=f"{job_url(job.id)}/artifact", size=job.artifact_size, sha256=job.artifact_sha256)
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
        events_url=f"{job_url(job.id)}/events",
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    responses={422: {"description": "invalid spec"}, 503: {"description": "the queue is unreachable"}},
)
def submit_job(spec: JobSpec, response: Response, session: SessionDep, settings: SettingsDep) -> JobOut:
    """Queue a pruning job. 201 with the job and its Location."""
    try:
        data = check_spec(spec, settings, session)
    except SpecError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=err.errors) from None
    job = crud.create_job(session, spec=data)
    session.commit()  # the worker must find the row: enqueue only after the commit
    try:
        task_id = enqueue_job(settings, job.id)
    except Exception as err:  # kombu/redis connection errors
        log.exception("could not enqueue job %s", job.id)
        crud.fail_unqueued(session, job_id=job.id, error=f"could not be queued: the broker is unreachable ({err})")
        session.commit()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="the job queue (Redis) is unreachable; try again") from None
    crud.set_task_id(session, job_id=job.id, task_id=task_id)
    session.commit()
    job = crud.get_job(session, job.id, details=True)
    response.headers["Location"] = job_url(job.id)
    return job_out(job)


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
def get_job(job_id: JobId, session: SessionDep, r: RedisDep) -> JobOut:
    job = _job_or_404(session, job_id, details=True)
    return job_out(job, live_progress(r, job))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses={**NOT_FOUND, 202: {"description": "running: it stops between modules"}, 409: {"description": "already finished"}},
)
def cancel_job(job_id: JobId, session: SessionDep, settings: SettingsDep, r: RedisDep) -> Response:
    """A queued job is cancelled at once (200); a running one is asked to stop (202) and ends
    `cancelled` between modules, leaving no partial artifact."""
    result = crud.request_cancel(session, job_id=job_id)
    session.commit()
    if result.outcome == "missing":
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    if result.outcome == "finished":
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job {job_id} is already {result.job.status}")
    try:
        if result.outcome == "requested":
            r.set(events.cancel_key(job_id), "1", ex=settings.job_time_limit_s)
        else:
            events.publish(
                r, job_id, "status", {"status": "cancelled", "attempt": result.job.attempt, "error": result.job.error},
                maxlen=settings.events_maxlen, ttl_s=settings.events_ttl_s,
            )
    except redis.RedisError:
        log.warning("Redis unreachable while cancelling job %s; the database flag stands", job_id)
    job = crud.get_job(session, job_id, details=True)
    code = status.HTTP_202_ACCEPTED if result.outcome == "requested" else status.HTTP_200_OK
    return JSONResponse(job_out(job).model_dump(mode="json"), status_code=code)


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
def download_artifact(job_id: JobId, session: SessionDep) -> StreamingResponse:
    """The pruned Hugging Face directory as one tar stream; its sha256 is in the
    X-Checksum-SHA256 and Repr-Digest headers and in the job."""
    job = _job_or_404(session, job_id)
    if job.status != SUCCEEDED:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job {job_id} is {job.status}; the artifact exists once it has succeeded")
    root = Path(job.artifact_path or "")
    if not job.artifact_path or not root.is_dir() or not job.artifact_sha256:
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
