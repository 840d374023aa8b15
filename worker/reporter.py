"""The Redis progress reporter: each engine event goes to the job's stream (what SSE clients
read) and to its latest-state key. Redis is best effort here: when it is down the job runs on,
and the database (heartbeat, final results) stays the record. An event names no path of the
server: the engine names uploads and the output as the user knows them (RunOptions.labels), and
any other absolute path left in a message is cut to its last part (a model directory's name)."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from typing import Any

import redis

from app import streams

log = logging.getLogger(__name__)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s/]+/)*([^\s/]+)/?")


def without_paths(text: str) -> str:
    """``text`` with each absolute path cut to its last part ("loading /srv/models/llama" -> "loading llama")."""
    return _ABSOLUTE_PATH.sub(r"\1", text)


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (browsers reject NaN in JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RedisProgress:
    """While Redis is down (restarting, unreachable), calls are skipped for ``backoff_s`` after
    each failure, so the engine never waits on it; the database keeps the job's record."""

    def __init__(
        self, client: redis.Redis, job_id: int, attempt: int, *, maxlen: int, ttl_s: int, backoff_s: float = 2.0
    ):
        self.client, self.job_id, self.attempt = client, job_id, attempt
        self.maxlen, self.ttl_s = maxlen, ttl_s
        self.backoff_s = backoff_s
        self.latest: dict[str, Any] | None = None
        self.events = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._warned_at = 0.0
        self._down_until = 0.0

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, err: Exception, what: str) -> None:
        self._down_until = time.monotonic() + self.backoff_s
        if time.monotonic() - self._warned_at > 60:
            log.warning("job %s: %s, Redis unavailable (%s); the job goes on", self.job_id, what, err)
            self._warned_at = time.monotonic()

    def _publish(self, kind: str, payload: dict[str, Any], ttl_s: int | None = None, *, force: bool = False) -> None:
        if not (force or self._available()):
            self.dropped += 1
            return
        try:
            streams.publish(self.client, self.job_id, kind, payload, maxlen=self.maxlen, ttl_s=ttl_s)
        except (redis.RedisError, OSError) as err:
            self.dropped += 1
            self._failed(err, "progress not published")

    def progress(self, event: dict[str, Any]) -> None:
        """The engine's ``on_progress``."""
        payload = _clean({**event, "attempt": self.attempt})
        for key in ("message", "module"):
            if isinstance(payload.get(key), str):
                payload[key] = without_paths(payload[key])
        with self._lock:
            self.latest = payload
            self.events += 1
        self._publish("progress", payload)

    def status(self, status: str, *, final: bool = False, **extra: Any) -> None:
        # A status event is always tried (the final one tells SSE clients the job is over).
        self._publish(
            "status",
            _clean({"status": status, "attempt": self.attempt, **extra}),
            ttl_s=self.ttl_s if final else None,
            force=True,
        )

    def snapshot(self) -> dict[str, Any] | None:
        with self._lock:
            return dict(self.latest) if self.latest else None

    def cancel_flag(self) -> bool:
        """The fast path of a cancel (the database flag, read by the heartbeat, is the sure one)."""
        if not self._available():
            return False
        try:
            return bool(self.client.exists(streams.cancel_key(self.job_id)))
        except (redis.RedisError, OSError) as err:
            self._failed(err, "cancel flag not read")
            return False

    def clear_cancel_flag(self) -> None:
        try:
            self.client.delete(streams.cancel_key(self.job_id))
        except (redis.RedisError, OSError):
            pass
