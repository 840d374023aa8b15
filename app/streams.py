"""Job events in Redis, shared by the API (reader, cancel flag) and the workers (writers).

Per job: a STREAM of events (``XADD ... MAXLEN ~``; a stream id is the SSE event id, so a
client resumes with Last-Event-ID), a key with the latest progress state, and a cancel flag.
Redis is ephemeral: whatever must last is written to the database as well.
"""

from __future__ import annotations

import json
import time
from typing import Any

PREFIX = "sparsegpt"


def stream_key(job_id: int) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def state_key(job_id: int) -> str:
    return f"{PREFIX}:job:{job_id}:state"


def cancel_key(job_id: int) -> str:
    return f"{PREFIX}:job:{job_id}:cancel"


def worker_key(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


WORKER_PATTERN = f"{PREFIX}:worker:*"


def encode(kind: str, payload: dict[str, Any]) -> dict[str, str]:
    """Stream entry fields: the SSE event name and its JSON data."""
    return {"type": kind, "data": json.dumps(payload, separators=(",", ":"), default=str)}


def publish(redis, job_id: int, kind: str, payload: dict[str, Any], *, maxlen: int, ttl_s: int | None = None) -> str:
    """XADD one event (sync client); ``ttl_s`` also sets the stream to expire (terminal events)."""
    payload = {"job": job_id, "type": kind, "ts": round(time.time(), 3), **payload}
    pipe = redis.pipeline(transaction=False)
    pipe.xadd(stream_key(job_id), encode(kind, payload), maxlen=maxlen, approximate=True)
    if kind == "progress":
        pipe.set(state_key(job_id), json.dumps(payload, default=str), ex=ttl_s or 7 * 24 * 3600)
    if ttl_s is not None:
        pipe.expire(stream_key(job_id), ttl_s)
        pipe.expire(state_key(job_id), ttl_s)
    entry_id = pipe.execute()[0]
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id
