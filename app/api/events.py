"""GET /jobs/{id}/events: Server-Sent Events from the job's Redis stream.

The first event (without Last-Event-ID) is ``snapshot``: the job as GET /jobs/{id} shows it,
with the stream id it is current up to. Then ``progress`` and ``status`` events follow, each
with its stream id as SSE id; the stream ends after the terminal status. A client that
reconnects with Last-Event-ID (the header EventSource sends, or ?last_event_id=) gets every
event after that id.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis
import redis.asyncio as aredis
from fastapi import APIRouter, Header, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app import crud, streams
from app.api.jobs import JobId, job_out
from app.services.jobs import live_progress
from app.models import TERMINAL

router = APIRouter(prefix="/jobs", tags=["jobs"])

_STREAM_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")
BLOCK_MS = 5000


def async_redis(settings) -> "aredis.Redis":
    """The asyncio Redis client the streams read with (one pool per API process)."""
    return aredis.Redis.from_url(settings.redis, decode_responses=True, health_check_interval=30)


def _sse(kind: str, data: str, event_id: str | None) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {kind}\ndata: {data}\n\n".encode()


def _decode(entry: tuple) -> tuple[str, str, str]:
    entry_id, fields = entry
    kind = fields.get("type", "progress")
    return entry_id, kind, fields.get("data", "{}")


def _is_terminal(kind: str, data: str) -> bool:
    if kind != "status":
        return False
    try:
        return json.loads(data).get("status") in TERMINAL
    except ValueError:
        return False


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "snapshot, progress and status events"},
        404: {"description": "no such job"},
        422: {"description": "malformed Last-Event-ID"},
    },
)
async def job_events(
    job_id: JobId,
    request: Request,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    last_event_id: Annotated[str | None, Query(description="resume after this event id")] = None,
) -> StreamingResponse:
    sessions = request.app.state.sessions
    r_sync: redis.Redis = request.app.state.redis
    r = request.app.state.aredis
    resume = last_event_id_header or last_event_id
    if resume is not None:
        resume = resume.strip()
        if not _STREAM_ID.match(resume):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"Last-Event-ID {resume!r} is not an event id of this stream")

    def load(with_snapshot: bool) -> tuple[str | None, dict[str, Any] | None, int]:
        with sessions() as session:
            job = crud.get_job(session, job_id, details=with_snapshot)
            if job is None:
                return None, None, 0
            snap = (
                job_out(job, live_progress(r_sync, job), retention_s=request.app.state.settings.artifact_retention_s).model_dump(mode="json")
                if with_snapshot else None
            )
            return job.status, snap, job.attempt

    job_status, _, _ = await run_in_threadpool(load, False)
    if job_status is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    key = streams.stream_key(job_id)

    async def drain_and_close(cursor: str) -> AsyncIterator[bytes]:
        """The job is over: send what is left in the stream, then a final status if none came."""
        entries = await r.xrange(key, min=f"({cursor}" if cursor != "0" else "-", max="+")
        for entry in entries:
            entry_id, kind, data = _decode(entry)
            yield _sse(kind, data, entry_id)
            if _is_terminal(kind, data):
                return
        final_status, snap, attempt = await run_in_threadpool(load, True)
        payload = {"job": job_id, "type": "status", "status": final_status, "attempt": attempt,
                   "error": (snap or {}).get("error")}
        yield _sse("status", json.dumps(payload), entries[-1][0] if entries else cursor)

    async def stream() -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        if resume is None:
            # The snapshot is current up to the newest stream entry read before it.
            latest = await r.xrevrange(key, count=1)
            cursor = latest[0][0] if latest else "0"
            current, snap, _ = await run_in_threadpool(load, True)
            yield _sse("snapshot", json.dumps(snap, default=str), cursor)
            if current in TERMINAL:
                return
        else:
            cursor = resume
            current, _, _ = await run_in_threadpool(load, False)
            if current in TERMINAL:
                async for chunk in drain_and_close(cursor):
                    yield chunk
                return
        while True:
            if await request.is_disconnected():
                return
            try:
                batch = await r.xread({key: cursor}, block=BLOCK_MS, count=200)
            except redis.RedisError:
                batch = None
                yield b": redis unavailable, retrying\n\n"
            if not batch:
                current, _, _ = await run_in_threadpool(load, False)
                if current is None:  # deleted meanwhile: end the stream (a reconnect gets 404)
                    return
                if current in TERMINAL:
                    async for chunk in drain_and_close(cursor):
                        yield chunk
                    return
                yield b": keepalive\n\n"
                continue
            for entry in batch[0][1]:
                entry_id, kind, data = _decode(entry)
                cursor = entry_id
                yield _sse(kind, data, entry_id)
                if _is_terminal(kind, data):
                    return

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

