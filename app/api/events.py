"""GET /jobs/{id}/events: Server-Sent Events from the job's Redis stream.

The first event (without Last-Event-ID) is ``snapshot``: the job as GET /jobs/{id} shows it,
with the stream id it is current up to. Then ``progress`` and ``status`` events follow, each
with its stream id as SSE id; the stream ends after the terminal status. A client that
reconnects with Last-Event-ID (the header EventSource sends, or ?last_event_id=) gets every
event after that id.

Limits (per API process): at most ``settings.max_streams_per_process`` open streams (503 with
Retry-After beyond it); each open stream holds at most one Redis connection, for one blocking
XREAD of ``BLOCK_MS`` at a time, from a pool sized for the cap. The job's status is read from the
database at most once per block period; while Redis is down a stream says so once (an SSE
comment) and retries with exponential back-off until Redis answers again.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis
import redis.asyncio as aredis
from fastapi import APIRouter, Header, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.concurrency import run_in_threadpool

from app import crud, streams
from app.api.jobs import JobId, job_out
from app.models import TERMINAL
from app.services.jobs import live_progress

router = APIRouter(prefix="/jobs", tags=["jobs"])

BLOCK_MS = 5000  # one XREAD blocks this long (then a keep-alive comment)
BLOCK_S = BLOCK_MS / 1000
SOCKET_TIMEOUT_S = BLOCK_S + 10  # larger than the block: an idle stream never times out
POOL_HEADROOM = 16  # connections beyond the stream cap (opening XREVRANGEs, closing XRANGEs)
POOL_WAIT_S = 5.0  # how long a stream waits for a pooled connection before it counts as an error
CHECK_S = BLOCK_S * 0.9  # the job's status is read from the database at most this often
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 10.0  # while Redis fails: 0.5, 1, 2, 4, 8, 10, 10, ... s
RETRY_AFTER_S = 15  # the Retry-After of a 503 (stream cap reached, Redis down at open)

ID_MAX = 2**64 - 1  # each part of a Redis stream id <ms>-<seq> is an unsigned 64-bit integer
_STREAM_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
_BAD_ID = "Last-Event-ID must be a stream id <ms>-<seq> (or <ms>), each part an integer from 0 to 2**64-1"


def async_redis(settings) -> aredis.Redis:
    """The asyncio Redis client the streams read with (one pool per API process).

    A blocking pool of max_streams_per_process + POOL_HEADROOM connections (a blocked XREAD
    holds one; a stream holds at most one at a time), so a full pool waits instead of raising;
    a socket timeout longer than the block time; one quick retry (a restarted Redis), the
    back-off is the stream loop's.
    """
    pool = aredis.BlockingConnectionPool.from_url(
        settings.redis,
        decode_responses=True,
        max_connections=max(1, settings.max_streams_per_process) + POOL_HEADROOM,
        timeout=POOL_WAIT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=2,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),
    )
    return aredis.Redis.from_pool(pool)


def parse_event_id(value: str) -> tuple[str, tuple[int, int]]:
    """A Last-Event-ID as Redis takes it (ASCII digits, each part <= 2**64-1), or a 422 that
    does not echo the input."""
    value = value.strip()
    match = _STREAM_ID.fullmatch(value) if len(value) <= 41 else None
    if match is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=_BAD_ID)
    ms, seq = int(match[1]), int(match[2] or 0)
    if ms > ID_MAX or seq > ID_MAX:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=_BAD_ID)
    return (f"{ms}-{seq}" if match[2] is not None else str(ms)), (ms, seq)


class StreamSlots:
    """The open streams of one app (one API process): a counter, asyncio-only (no lock)."""

    def __init__(self, limit: int):
        self.limit, self.open = limit, 0

    def acquire(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open = max(0, self.open - 1)


def stream_slots(app) -> StreamSlots:
    slots = getattr(app.state, "stream_slots", None)
    if slots is None:
        slots = app.state.stream_slots = StreamSlots(app.state.settings.max_streams_per_process)
    return slots


class _SlotStream(StreamingResponse):
    """Gives its slot back when the response ends: done, failed, or the client went away
    (Starlette cancels the body when it sees the disconnect; a body never started counts too)."""

    def __init__(self, content, slots: StreamSlots, **kwargs):
        super().__init__(content, **kwargs)
        self._slots, self._released = slots, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._slots.release()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


class StatusReads:
    """The job statuses a process's streams check, shared: a job's status is read from the database at
    most once per ``CHECK_S`` whatever the number of its streams (200 idle streams of one job made about
    40 reads a second, each a thread-pool hop beside the requests being served), and streams that ask
    at the same moment wait for one read. A status is at most ``CHECK_S`` old, as each stream's own
    check was; the stream's events carry the job's changes as they happen."""

    KEEP = 1024  # statuses remembered; older ones are dropped past this

    def __init__(self):
        self._seen: dict[int, tuple[float, Any]] = {}
        self._reading: dict[int, asyncio.Task] = {}

    async def read(self, job_id: int, load) -> Any:
        """``load()`` (blocking: run in the thread pool) for ``job_id``, or what it gave within ``CHECK_S``.
        The read is a task of its own: a stream that goes away while waiting does not cancel the others' read."""
        seen = self._seen.get(job_id)
        if seen is not None and time.monotonic() - seen[0] < CHECK_S:
            return seen[1]
        task = self._reading.get(job_id)
        if task is None:
            task = self._reading[job_id] = asyncio.ensure_future(run_in_threadpool(load))
            task.add_done_callback(lambda done, job_id=job_id: self._done(job_id, done))
        return await asyncio.shield(task)

    def _done(self, job_id: int, task: asyncio.Task) -> None:
        self._reading.pop(job_id, None)
        if task.cancelled() or task.exception() is not None:  # each waiter gets the error; nothing kept
            return
        if len(self._seen) >= self.KEEP:
            self._seen.clear()
        self._seen[job_id] = (time.monotonic(), task.result())


def status_reads(app) -> StatusReads:
    reads = getattr(app.state, "status_reads", None)
    if reads is None:
        reads = app.state.status_reads = StatusReads()
    return reads


def _unavailable(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE, detail=detail, headers={"Retry-After": str(RETRY_AFTER_S)}
    )


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
        503: {"description": "this API process serves its most streams, or Redis is down (see Retry-After)"},
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
    r: aredis.Redis = request.app.state.aredis
    resume = last_event_id_header or last_event_id
    resume_at: tuple[int, int] | None = None
    if resume is not None:
        resume, resume_at = parse_event_id(resume)
    slots = stream_slots(request.app)
    if not slots.acquire():
        raise _unavailable(
            f"this server has {slots.limit} live streams open; poll GET /api/v1/jobs/{job_id} or retry later"
        )
    response: _SlotStream | None = None
    try:
        response = await _open(job_id, request, sessions, r_sync, r, resume, resume_at, slots)
        return response
    finally:
        if response is None:  # refused (404, 503) or failed before the stream began
            slots.release()


async def _open(job_id, request, sessions, r_sync, r, resume, resume_at, slots) -> _SlotStream:
    # Long on purpose: one async generator's state (snapshot, replay after Last-Event-ID, the live loop and its back-
    # off) stays in one place.
    settings = request.app.state.settings

    def load(with_snapshot: bool) -> tuple[str | None, dict[str, Any] | None, int]:
        with sessions() as session:
            job = crud.get_job(session, job_id, details=with_snapshot)
            if job is None:
                return None, None, 0
            snap = (
                job_out(job, live_progress(r_sync, job), retention_s=settings.artifact_retention_s).model_dump(
                    mode="json"
                )
                if with_snapshot
                else None
            )
            return job.status, snap, job.attempt

    key = streams.stream_key(job_id)
    snapshot: dict[str, Any] | None = None
    if resume is None:
        # The snapshot is current up to the newest stream entry read before it.
        try:
            latest = await r.xrevrange(key, count=1)
        except redis.RedisError:
            job_status, _, _ = await run_in_threadpool(load, False)
            if job_status is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found") from None
            raise _unavailable(
                f"live progress is unavailable (Redis is down); poll GET /api/v1/jobs/{job_id}"
            ) from None
        cursor = latest[0][0] if latest else "0"
        job_status, snapshot, _ = await run_in_threadpool(load, True)
    else:
        cursor = resume
        job_status, _, _ = await run_in_threadpool(load, False)
    if job_status is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")

    async def drain_and_close(cursor: str, at_end: bool) -> AsyncIterator[bytes]:
        """The job is over: send what is left in the stream, then a final status if none came."""
        entries: list = []
        if not at_end:  # "(<max>-<max>" is no valid range start, and nothing comes after it
            try:
                entries = await r.xrange(key, min=f"({cursor}" if cursor != "0" else "-", max="+")
            except redis.RedisError:
                entries = []  # Redis is down: the database's final status is all there is
        for entry in entries:
            entry_id, kind, data = _decode(entry)
            yield _sse(kind, data, entry_id)
            if _is_terminal(kind, data):
                return
        final_status, snap, attempt = await run_in_threadpool(load, True)
        payload = {
            "job": job_id,
            "type": "status",
            "status": final_status,
            "attempt": attempt,
            "error": (snap or {}).get("error"),
        }
        yield _sse("status", json.dumps(payload), entries[-1][0] if entries else cursor)

    async def stream() -> AsyncIterator[bytes]:
        nonlocal cursor
        at_end = resume_at == (ID_MAX, ID_MAX)
        yield b"retry: 2000\n\n"
        if snapshot is not None:
            yield _sse("snapshot", json.dumps(snapshot, default=str), cursor)
        if job_status in TERMINAL:
            if snapshot is None:
                async for chunk in drain_and_close(cursor, at_end):
                    yield chunk
            return
        next_check = time.monotonic() + CHECK_S  # the database: at most about once per block period
        backoff, down = BACKOFF_MIN_S, False
        while True:
            if await request.is_disconnected():
                return
            batch = None
            try:
                batch = await r.xread({key: cursor}, block=BLOCK_MS, count=200)
                backoff, down = BACKOFF_MIN_S, False
            except redis.RedisError:
                if not down:  # once per outage, not per attempt
                    down = True
                    yield b": redis unavailable, retrying\n\n"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            if batch:
                for entry in batch[0][1]:
                    entry_id, kind, data = _decode(entry)
                    cursor = entry_id
                    at_end = False
                    yield _sse(kind, data, entry_id)
                    if _is_terminal(kind, data):
                        return
                continue
            now = time.monotonic()
            if now < next_check:
                continue
            next_check = now + CHECK_S
            current, _, _ = await status_reads(request.app).read(job_id, lambda: load(False))
            if current is None:  # deleted meanwhile: end the stream (a reconnect gets 404)
                return
            if current in TERMINAL:
                async for chunk in drain_and_close(cursor, at_end):
                    yield chunk
                return
            yield b": keepalive\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return _SlotStream(stream(), slots, media_type="text/event-stream", headers=headers)
