"""The live streams' database checks are shared per job (app.api.events.StatusReads): however many
streams of a job are open in a process, its status is read at most once per CHECK_S, concurrent
checks wait for one read, a stream that goes away does not cancel the others' read, and an error
reaches every waiter and is not remembered."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.api import events
from app.api.events import StatusReads


class CountingLoad:
    """A blocking status read (as the database's, in the thread pool) that counts its calls."""

    def __init__(self, value="running", delay_s: float = 0.05, error: Exception | None = None):
        self.value, self.delay_s, self.error = value, delay_s, error
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.calls += 1
        time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.value


def test_many_streams_of_one_job_read_once():
    async def run():
        reads, load = StatusReads(), CountingLoad()
        results = await asyncio.gather(*(reads.read(7, load) for _ in range(200)))
        assert results == ["running"] * 200 and load.calls == 1
        assert await reads.read(7, load) == "running" and load.calls == 1  # within CHECK_S: remembered
        other = CountingLoad("queued")
        assert await reads.read(8, other) == "queued" and other.calls == 1  # another job: its own read

    asyncio.run(run())


def test_a_status_is_read_again_after_check_s(monkeypatch):
    monkeypatch.setattr(events, "CHECK_S", 0.1)

    async def run():
        reads, load = StatusReads(), CountingLoad(delay_s=0)
        await reads.read(1, load)
        await asyncio.sleep(0.15)
        load.value = "succeeded"
        assert await reads.read(1, load) == "succeeded" and load.calls == 2

    asyncio.run(run())


def test_a_stream_going_away_does_not_cancel_the_others_read():
    async def run():
        reads, load = StatusReads(), CountingLoad(delay_s=0.2)
        first = asyncio.ensure_future(reads.read(3, load))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(reads.read(3, load))
        await asyncio.sleep(0.02)
        first.cancel()  # the first stream's client disconnected mid-read
        assert await second == "running" and load.calls == 1
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(run())


def test_an_error_reaches_every_waiter_and_is_not_remembered():
    async def run():
        reads, load = StatusReads(), CountingLoad(error=RuntimeError("database down"))
        results = await asyncio.gather(*(reads.read(5, load) for _ in range(10)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results) and load.calls == 1
        load.error = None
        assert await reads.read(5, load) == "running" and load.calls == 2

    asyncio.run(run())
