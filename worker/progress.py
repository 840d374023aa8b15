"""The Redis progress reporter: each engine event goes to the job's stream (what SSE clients
read) and to its latest-state key. Redis is best effort here: when it is down the job runs on,
and the database (heartbeat, final results) stays the record."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import redis

from app import events

log = logging.getLogger(__name__)


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
    def __init__(self, client: redis.Redis, job_id: int, attempt: int, *, maxlen: int, ttl_s: int):
        self.client, self.job_id, self.attempt = client, job_id, attempt
        self.maxlen, self.ttl_s = maxlen, ttl_s
        self.latest: dict[str, Any] | None = None
        self.events = 0
        self._lock = threading.Lock()
        self._warned_at = 0.0

    def _publish(self, kind: str, payload: dict[str, Any], ttl_s: int | None = None) -> None:
        try:
            events.publish(self.client, self.job_id, kind, payload, maxlen=self.maxlen, ttl_s=ttl_s)
        except redis.RedisError as err:
            if time.monotonic() - self._warned_at > 60:
                log.warning("job %s: progress not published, Redis unavailable: %s", self.job_id, err)
                self._warned_at = time.monotonic()

    def progress(self, event: dict[str, Any]) -> None:
        """The engine's ``on_progress``."""
        payload = _clean({**event, "attempt": self.attempt})
        with self._lock:
            self.latest = payload
            self.events += 1
        self._publish("progress", payload)

    def status(self, status: str, *, final: bool = False, **extra: Any) -> None:
        self._publish("status", _clean({"status": status, "attempt": self.attempt, **extra}),
                      ttl_s=self.ttl_s if final else None)

    def snapshot(self) -> dict[str, Any] | None:
        with self._lock:
            return dict(self.latest) if self.latest else None

    def cancel_flag(self) -> bool:
        try:
            return bool(self.client.exists(events.cancel_key(self.job_id)))
        except redis.RedisError:
            return False

    def clear_cancel_flag(self) -> None:
        try:
            self.client.delete(events.cancel_key(self.job_id))
        except redis.RedisError:
            pass
