"""A running attempt's two stop signals, and the heartbeat that keeps its claim alive.

While the engine runs, a background thread beats the job row every ``heartbeat_interval_s``
(with the latest progress): the sweeper takes a job over only once its heartbeat is stale. The
beat also reads the row's cancel flag (the sure path of a cancel) and learns when another
attempt owns the job (``lost``: stop quietly). ``should_cancel`` is the engine's callback: it
polls the Redis cancel flag (the fast path) at most every 0.2 s between modules and blocks.
The same thread reads the process's memory every second (``worker.memory.MemoryWatch``: recorded
for the worker's main process, and the soft limit that stops the job before the kernel does).
"""

from __future__ import annotations

import logging
import threading
import time

from app import crud, db
from worker.memory import MemoryWatch
from worker.reporter import RedisProgress

log = logging.getLogger(__name__)

FLAG_POLL_S = 0.2  # the Redis flag is read at most this often (the engine asks far more often)
MEMORY_POLL_S = 1.0  # the process's memory is read this often


class Liveness:
    """``with Liveness(...) as live: run_job(..., should_cancel=live.should_cancel)``."""

    def __init__(
        self,
        url: str,
        job_id: int,
        attempt: int,
        reporter: RedisProgress,
        *,
        interval_s: float,
        watch: MemoryWatch | None = None,
    ):
        self.url, self.job_id, self.attempt, self.reporter = url, job_id, attempt, reporter
        self.interval_s = interval_s
        self.watch = watch
        self.cancel = threading.Event()  # set by the heartbeat (database flag) or the Redis flag
        self.lost = threading.Event()  # another attempt owns the job now: stop quietly
        self._stop = threading.Event()
        self._last_flag_check = 0.0
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Liveness:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def should_cancel(self) -> bool:
        """Polled by the engine between modules and blocks."""
        if self.cancel.is_set() or self.lost.is_set():
            return True
        now = time.monotonic()
        if now - self._last_flag_check >= FLAG_POLL_S:
            self._last_flag_check = now
            if self.reporter.cancel_flag():
                self.cancel.set()
        return self.cancel.is_set()

    def _beat(self) -> None:
        step = min(self.interval_s, MEMORY_POLL_S) if self.watch is not None else self.interval_s
        due = time.monotonic() + self.interval_s
        while not self._stop.wait(step):
            if self.watch is not None:
                try:
                    self.watch.check(record_every_s=self.interval_s)
                except Exception as err:  # never let a reading stop the heartbeat
                    log.warning("job %s: memory reading failed: %s", self.job_id, err)
            if time.monotonic() < due - step / 2:  # (a wait may end a hair early)
                continue
            due = time.monotonic() + self.interval_s
            if not self._heartbeat():
                return

    def _heartbeat(self) -> bool:
        """One beat; False once another attempt owns the job (the thread ends)."""
        try:
            with db.session_scope(self.url) as session:
                ours, cancel = crud.heartbeat(
                    session, job_id=self.job_id, attempt=self.attempt, progress=self.reporter.snapshot()
                )
        except Exception as err:  # the database restarting: try again next beat
            log.warning("job %s: heartbeat failed: %s", self.job_id, err)
            return True
        if cancel:
            self.cancel.set()
        if not ours:
            self.lost.set()
            return False
        return True
