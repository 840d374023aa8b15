"""Jobs over REST: submit, list, read, retry, cancel, delete, download the artifact. The routes
parse and render; ``app.services.jobs`` does the work."""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import TypeAdapter

from app import archive, db, packagers
from app.api.deps import RedisDep, SessionDep, SettingsDep, check_idempotency_key, idempotency_key_header, replayed
from app.auth import UserDep
from app.crud import list_job_summaries
from app.models import SUCCEEDED, Job
from app.schemas import (
    ArtifactFileOut,
    ArtifactOut,
    JobList,
    JobOut,
    JobSpec,
    JobStatus,
    MetricOut,
    ModuleResultOut,
)
from app.services import jobs, plans
from app.services.jobs import job_url, live_progress
from app.services.specs import SpecError

router = APIRouter(prefix="/jobs", tags=["jobs"])

NOT_FOUND = {404: {"description": "no such job"}}
FORBIDDEN = {403: {"description": "only the job's owner or an admin may do this"}}
LIMITED = {429: {"description": "the per-user cap on queued + running jobs is reached"}}
IdempotencyKey = idempotency_key_header("job")
JobId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="the job's id")]


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


def _file_name(job_id: int, format: str) -> str:
    packager = packagers.get(format)
    stem = archive.artifact_name(job_id)
    return packager.file_name(stem) if packager is not None else f"{stem}.{format}"


def job_out(job: Job, progress: dict[str, Any] | None = None, *, retention_s: int = 0) -> JobOut:
    artifact, files, ratios = None, [], packagers.format_ratios(job.result)
    if (
        job.status == SUCCEEDED
        and job.artifact_sha256
        and job.artifact_size is not None
        and job.artifact_expired_at is None
    ):
        expires = job.finished_at + timedelta(seconds=retention_s) if retention_s > 0 and job.finished_at else None
        artifact = ArtifactOut(
            url=f"{job_url(job.id)}/artifact", size=job.artifact_size, sha256=job.artifact_sha256, expires_at=expires
        )
        files = [
            ArtifactFileOut(
                format=a.format,
                size=a.size,
                sha256=a.sha256,
                media_type=a.media_type,
                url=f"{job_url(job.id)}/artifacts/{a.format}",
                file_name=_file_name(job.id, a.format),
                expires_at=expires,
                ratio=ratios.get(a.format),
            )
            for a in job.artifacts
            if a.expired_at is None
        ]
    return JobOut(
        **summary(job, progress),
        spec=job.spec,
        cancel_requested=job.cancel_requested,
        heartbeat_at=job.heartbeat_at,
        worker=job.worker,
        queue=job.queue,
        result=job.result,
        metrics=[MetricOut.model_validate(m) for m in job.metrics],
        modules=[ModuleResultOut.model_validate(m) for m in job.modules],
        artifact=artifact,
        artifacts=files,
        artifact_expired_at=job.artifact_expired_at,
        retry_of=job.retry_of,
        events_url=f"{job_url(job.id)}/events",
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "the job an earlier request with this Idempotency-Key made"},
        409: {"description": "an earlier request with this Idempotency-Key is still queueing its job (Retry-After)"},
        422: {"description": "invalid spec, or an Idempotency-Key reused with another body"},
        **LIMITED,
        503: {
            "description": "the queue is unreachable: nothing was queued; send it again (with the same "
            "Idempotency-Key, it makes the job once)"
        },
    },
)
def submit_job(
    spec: JobSpec,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    user: UserDep,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Queue a pruning job. 201 with the job and its Location."""
    check_idempotency_key(idempotency_key)
    try:
        created = jobs.create(session, settings, user, spec, idempotency_key=idempotency_key)
    except SpecError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=err.errors) from None
    body = job_out(created.job, retention_s=settings.artifact_retention_s)
    if created.replayed:
        return replayed(body.model_dump(mode="json"), job_url(created.job.id))
    response.headers["Location"] = job_url(created.job.id)
    return body


@router.get("", response_model=JobList)
async def list_jobs(
    request: Request,
    status_: Annotated[JobStatus | None, Query(alias="status", description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> Response:
    """Newest first."""
    body = await db.run_read(_listing, request.app.state.sessions, status_, limit, offset)
    return Response(body, media_type="application/json")


_JOB_LIST = TypeAdapter(JobList)


def _listing(sessions, status_: JobStatus | None, limit: int, offset: int) -> bytes:
    """The page as JSON, in one hop to a reader thread: a Core connection (no ORM session), the rows
    checked against JobList and serialized once (the route returns the bytes, so FastAPI does
    not check and serialize them again)."""
    with db.connect(sessions) as connection:
        rows, total = list_job_summaries(connection, status=status_, limit=limit, offset=offset)
    for row in rows:
        row["url"] = job_url(row["id"])
    page = {"items": rows, "total": total, "limit": limit, "offset": offset}
    return _JOB_LIST.dump_json(_JOB_LIST.validate_python(page))


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND)
def get_job(job_id: JobId, session: SessionDep, r: RedisDep, settings: SettingsDep) -> JobOut:
    job = jobs.get_or_404(session, job_id, details=True)
    return job_out(job, live_progress(r, job), retention_s=settings.artifact_retention_s)


@router.post(
    "/{job_id}/retry",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    responses={
        **NOT_FOUND,
        **FORBIDDEN,
        409: {"description": "the job has not finished"},
        422: {"description": "its spec is no longer allowed here"},
        **LIMITED,
        503: {"description": "the queue is unreachable: nothing was queued; send it again"},
    },
)
def retry_job(job_id: JobId, response: Response, session: SessionDep, settings: SettingsDep, user: UserDep) -> JobOut:
    """A new job with the same spec (checked again against today's limits); the old one stays."""
    try:
        job = jobs.retry(session, settings, user, job_id)
    except SpecError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=err.errors) from None
    plans.job_changed(session, settings, job.plan_id)  # its plan's point names the new job
    response.headers["Location"] = job_url(job.id)
    return job_out(job, retention_s=settings.artifact_retention_s)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={**NOT_FOUND, **FORBIDDEN, 409: {"description": "running: cancel it first"}},
)
def delete_job(job_id: JobId, session: SessionDep, settings: SettingsDep, r: RedisDep, user: UserDep) -> Response:
    """Remove a queued or finished job: its row, results, events and artifact files."""
    jobs.delete(session, settings, r, user, job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses={
        **NOT_FOUND,
        **FORBIDDEN,
        202: {"model": JobOut, "description": "running: it stops between modules"},
        409: {"description": "already finished"},
    },
)
def cancel_job(job_id: JobId, session: SessionDep, settings: SettingsDep, r: RedisDep, user: UserDep) -> Response:
    """A queued job is cancelled at once (200); a running one is asked to stop (202) and ends
    `cancelled` between modules, leaving no partial artifact."""
    result = jobs.cancel(session, settings, r, user, job_id)
    if result.outcome == "finished":
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job {job_id} is already {result.job.status}")
    job = jobs.get_or_404(session, job_id, details=True)
    plans.job_changed(session, settings, job.plan_id)  # a budget search goes on without it
    code = status.HTTP_202_ACCEPTED if result.outcome == "requested" else status.HTTP_200_OK
    body = job_out(job, retention_s=settings.artifact_retention_s)
    return JSONResponse(body.model_dump(mode="json"), status_code=code)


_DOWNLOAD_ERRORS = {
    **NOT_FOUND,
    409: {"description": "the job has not succeeded"},
    410: {"description": "the artifact was removed"},
    416: {"description": "the range starts past the file's end"},
    503: {"description": "the object store is unreachable (Retry-After)"},
}
RangeHeader = Annotated[
    str | None, Header(alias="Range", max_length=200, description="one `bytes=` range resumes a download (206)")
]
IfRangeHeader = Annotated[str | None, Header(alias="If-Range", max_length=200)]


@router.get(
    "/{job_id}/artifact",
    response_class=StreamingResponse,
    responses={
        200: {"content": {archive.MEDIA_TYPE: {}}, "description": "the pruned model directory as a tar archive"},
        206: {"content": {archive.MEDIA_TYPE: {}}, "description": "the bytes a `Range: bytes=a-b` header asked for"},
        **_DOWNLOAD_ERRORS,
    },
)
def download_artifact(
    job_id: JobId,
    session: SessionDep,
    settings: SettingsDep,
    range_: RangeHeader = None,
    if_range: IfRangeHeader = None,
) -> Response:
    """The pruned Hugging Face directory as one tar stream (the default format); its sha256 (of
    the whole archive, also for a range) is in the X-Checksum-SHA256 and Repr-Digest headers and
    in the job."""
    return _serve(jobs.artifact(session, settings, job_id), range_, if_range)


@router.get(
    "/{job_id}/artifacts/{format}",
    response_class=StreamingResponse,
    responses={
        200: {"description": "the job's artifact in this format (its media type: the job's `artifacts` list)"},
        206: {"description": "the bytes a `Range: bytes=a-b` header asked for"},
        **_DOWNLOAD_ERRORS,
    },
)
def download_artifact_format(
    job_id: JobId,
    session: SessionDep,
    settings: SettingsDep,
    format: Annotated[
        str,
        PathParam(
            max_length=32,
            pattern=r"^[a-z0-9-]+$",
            description=f"an artifact format ({packagers.DEFAULT_FORMAT} is the default)",
        ),
    ],
    range_: RangeHeader = None,
    if_range: IfRangeHeader = None,
) -> Response:
    """One of the job's artifacts by format (its `artifacts` list names them), resumable the same way."""
    return _serve(jobs.artifact(session, settings, job_id, format), range_, if_range)


def _serve(download: jobs.Download, range_: str | None, if_range: str | None) -> Response:
    """The whole file (200) or one range of it (206, 416), with its sha256 in the headers."""
    row = download.artifact
    size, media_type = row.size, row.media_type
    digest_b64 = base64.b64encode(bytes.fromhex(row.sha256)).decode()
    headers = {
        "Content-Disposition": f'attachment; filename="{download.file_name}"',
        "X-Checksum-SHA256": row.sha256,
        "Repr-Digest": f"sha-256=:{digest_b64}:",
        "ETag": f'"{row.sha256}"',
        "Accept-Ranges": "bytes",
    }
    wanted = archive.parse_range(range_, size) if if_range in (None, headers["ETag"]) else None
    if wanted == "unsatisfiable":
        return Response(
            status_code=status.HTTP_416_RANGE_NOT_SATISFIABLE, headers={"Content-Range": f"bytes */{size}", **headers}
        )
    if wanted is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(download.body(), media_type=media_type, headers=headers)
    start, end = wanted
    headers["Content-Length"] = str(end - start)
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    return StreamingResponse(
        download.body(start, end), status_code=status.HTTP_206_PARTIAL_CONTENT, media_type=media_type, headers=headers
    )
