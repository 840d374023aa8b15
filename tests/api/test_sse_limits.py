"""Live progress streams (GET /api/v1/jobs/{id}/events) against a real API process: Last-Event-ID
limited to Redis's id range, no busy loop (a far-future id blocks; a Redis that answers every
read with an error is retried with back-off, announced once), a per-process stream cap (503 +
Retry-After, slots given back when clients leave), idle streams that never report a false
"redis unavailable", a Redis outage mid-stream survived, and 500 open streams that leave the
other routes fast (slow)."""

from __future__ import annotations

import math
import time

import httpx
import pytest
import redis

from app import streams
from tests.support.sse_clients import KEEPALIVE, UNAVAILABLE, ManyStreams, SyncStream, start_api

BLOCK_S = 5.0  # app.api.events.BLOCK_MS: one XREAD's block, a keep-alive comment after each
MAX = 2**64 - 1


@pytest.fixture(scope="module")
def api(module_redis, models_dir, tmp_path_factory):
    server = start_api(tmp_path_factory.mktemp("sse"), module_redis.url, models_dir)
    yield server
    server.proc.stop()


def refusal(api, path: str, **kwargs) -> httpx.Response:
    """GET ``path``; a 200 event stream is not read on (it would not end): its status is enough."""
    with httpx.stream(
        "GET", f"{api.base}{path}", headers={**api.auth, **kwargs.pop("headers", {})}, timeout=15, **kwargs
    ) as response:
        if response.status_code != 200:
            response.read()
        return response


def events_path(job_id: int, last_event_id: str | None = None) -> str:
    return f"/api/v1/jobs/{job_id}/events" + (f"?last_event_id={last_event_id}" if last_event_id is not None else "")


@pytest.mark.parametrize(
    "bad",
    [
        "99999999999999999999",  # > 2**64-1 (20 digits: the old pattern let it through)
        "1-99999999999999999999",  # the sequence part too large
        f"{MAX + 1}-0",
        f"0-{MAX + 1}",
        "１２-3",  # non-ASCII digits
        "1-",
        "-1",
        "1-2-3",
        "abc",
        "9" * 5000,
    ],
    ids=lambda bad: bad if len(bad) < 42 else f"{bad[:8]}...({len(bad)} chars)",
)
def test_last_event_id_outside_redis_range_is_422(api, models_dir, bad):
    job_id = api.jobs[0] if api.jobs else api.new_job(models_dir)
    for kwargs in ({"params": {"last_event_id": bad}}, {"headers": {"Last-Event-ID": bad}}):
        if "headers" in kwargs and not bad.isascii():
            continue  # a header is latin-1 bytes on the wire
        response = refusal(api, f"/api/v1/jobs/{job_id}/events", **kwargs)
        assert response.status_code == 422, (bad[:40], response.status_code)
        assert "2**64-1" in response.json()["detail"]
        assert len(response.content) < 400  # a short reason
        assert len(bad) < 8 or bad not in response.text  # the input not echoed


def test_ids_at_the_range_edges_are_accepted(api, models_dir):
    job_id = api.jobs[0] if api.jobs else api.new_job(models_dir)
    for good in ("0", "0-0", f"{MAX}", f"{MAX}-{MAX}", "1796060958445-3"):
        stream = SyncStream(api, events_path(job_id, good))
        try:
            assert stream.status == 200, stream.data[:300]
        finally:
            stream.close()


@pytest.mark.timeout(120)
def test_idle_streams_block_quietly(api, models_dir):
    """Over 2.5 block periods: a fresh stream, one resuming at a far-future id and one at the
    largest id each get keep-alive comments only (no false "redis unavailable" from a socket
    timeout), and the API process stays idle (no loop spinning on Redis or the database)."""
    job_id = api.new_job(models_dir)
    opened = [
        SyncStream(api, events_path(job_id)),
        SyncStream(api, events_path(job_id, "9999999999999-0")),
        SyncStream(api, events_path(job_id, f"{MAX}-{MAX}")),
    ]
    try:
        assert [s.status for s in opened] == [200, 200, 200]
        assert opened[0].read_until(b"event: snapshot", 15), opened[0].data[:300]
        cpu = api.cpu_s()
        window = 2.5 * BLOCK_S
        start = time.monotonic()
        for stream in opened:
            stream.read_for(max(0.1, window - (time.monotonic() - start)))
        used = api.cpu_s() - cpu
    finally:
        for stream in opened:
            stream.close()
    for stream in opened:
        assert UNAVAILABLE not in stream.data, stream.data[-400:]
        assert stream.data.count(KEEPALIVE) >= 2, stream.data[-400:]
        assert b"event: progress" not in stream.data and b"event: status" not in stream.data
    # Three blocked streams cost next to nothing; a loop re-reading Redis and the database without
    # blocking burns most of a core (~740 iterations/s before the fix).
    assert used < 0.15 * window, f"the API used {used:.2f} s of CPU in {window} s with 3 idle streams"


@pytest.mark.timeout(120)
def test_redis_errors_back_off_and_are_announced_once(api, models_dir, module_redis):
    """Redis answering every XREAD with an error (here: the stream's key holds a string) makes
    the stream back off (announced once), not re-read Redis and the database in a tight loop."""
    job_id = api.new_job(models_dir)
    broken = redis.Redis.from_url(module_redis.url)
    broken.set(streams.stream_key(job_id), "not a stream")
    stream = SyncStream(api, events_path(job_id, "1-0"))
    try:
        assert stream.status == 200
        assert stream.read_until(UNAVAILABLE, 10), stream.data[:300]
        cpu = api.cpu_s()
        stream.read_for(6)
        used = api.cpu_s() - cpu
        assert stream.data.count(UNAVAILABLE) == 1, stream.data.count(UNAVAILABLE)
        assert used < 1.0, f"the API used {used:.2f} s of CPU in 6 s retrying one stream"
        broken.delete(streams.stream_key(job_id))  # Redis answers again: the stream resumes
        entry = streams.publish(broken, job_id, "progress", {"stage": "pruning", "marker": "after-errors"}, maxlen=100)
        assert stream.read_until(b"after-errors", 3 * BLOCK_S), stream.data[-400:]
        assert f"id: {entry}".encode() in stream.data
    finally:
        stream.close()
        broken.delete(streams.stream_key(job_id))


@pytest.mark.timeout(180)
def test_stream_cap_answers_503_and_frees_slots(module_redis, models_dir, tmp_path):
    api = start_api(tmp_path, module_redis.url, models_dir, name="capped", max_streams_per_process="3")
    opened: list[SyncStream] = []
    try:
        job_id = api.new_job(models_dir)
        for _ in range(3):
            opened.append(SyncStream(api, events_path(job_id)))
            assert opened[-1].status == 200 and opened[-1].read_until(b"event: snapshot", 15)
        refused = refusal(api, events_path(job_id))
        assert refused.status_code == 503, refused.status_code
        assert int(refused.headers["retry-after"]) > 0 and "3 live streams" in refused.json()["detail"]
        # Other routes are not capped.
        assert httpx.get(f"{api.base}/api/v1/me", headers=api.auth, timeout=10).status_code == 200
        assert refusal(api, events_path(999999)).status_code == 503  # the cap is checked first
        # A client that leaves gives its slot back at once (its stream is blocked in XREAD: the
        # disconnect itself frees the slot, before the next keep-alive would have been written).
        opened.pop(0).close()
        deadline = time.monotonic() + 0.8 * BLOCK_S
        while True:
            again = SyncStream(api, events_path(job_id))
            if again.status == 200:
                break
            again.close()
            assert time.monotonic() < deadline, "the closed stream's slot was not given back"
            time.sleep(0.2)
        opened.append(again)
        assert again.read_until(b"event: snapshot", 15)
        for stream in opened:
            stream.close()
        opened.clear()
        time.sleep(1.0)
        # All three slots free again; refused opens (404, 422) do not keep one.
        for _ in range(4):
            assert refusal(api, events_path(999999)).status_code == 404
            assert refusal(api, events_path(job_id, "x")).status_code == 422
        for _ in range(3):
            opened.append(SyncStream(api, events_path(job_id)))
            assert opened[-1].status == 200, opened[-1].data[:300]
    finally:
        for stream in opened:
            stream.close()
        api.proc.stop()


@pytest.mark.timeout(180)
def test_redis_outage_mid_stream(redis_server, models_dir, tmp_path):
    """Redis killed under an open stream: one "redis unavailable" comment, back-off (no spin),
    a new stream refused with 503 + Retry-After meanwhile; Redis back: the stream resumes."""
    api = start_api(tmp_path, redis_server.url, models_dir, name="outage")
    stream = None
    try:
        job_id = api.new_job(models_dir)
        stream = SyncStream(api, events_path(job_id))
        assert stream.status == 200 and stream.read_until(b"event: snapshot", 15)
        redis_server.kill()
        assert stream.read_until(UNAVAILABLE, 3 * BLOCK_S), stream.data[-300:]
        cpu = api.cpu_s()
        stream.read_for(7)
        used = api.cpu_s() - cpu
        refused = refusal(api, events_path(job_id))
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0, refused.status_code
        assert used < 1.5, f"the API used {used:.2f} s of CPU in 7 s of Redis outage with one stream"
        redis_server.start()  # the same port, empty (nothing was saved)
        live = redis.Redis.from_url(redis_server.url)
        entry = streams.publish(live, job_id, "progress", {"stage": "pruning", "marker": "after-outage"}, maxlen=100)
        assert stream.read_until(b"after-outage", 15 + BLOCK_S), stream.data[-400:]
        assert f"id: {entry}".encode() in stream.data
        assert stream.data.count(UNAVAILABLE) == 1, stream.data.count(UNAVAILABLE)
    finally:
        if stream is not None:
            stream.close()
        api.proc.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_500_open_streams_leave_other_routes_fast(module_redis, models_dir, tmp_path):
    """500 streams really open (each got its snapshot, then keep-alives, never "redis
    unavailable"): p99 of 150 sequential GET /api/v1/me stays under 200 ms."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a stream costs the API 2 descriptors
    if soft != resource.RLIM_INFINITY and soft < 4096 and (hard == resource.RLIM_INFINITY or hard > soft):
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096 if hard == resource.RLIM_INFINITY else min(4096, hard), hard))
    api = start_api(tmp_path, module_redis.url, models_dir, name="many", max_streams_per_process="600")
    many = None
    try:
        job_id = api.new_job(models_dir)
        many = ManyStreams(api, events_path(job_id), 500)
        many.open()
        got = many.wait_all(b"event: snapshot", 120)
        assert got == 500, f"only {got} of 500 streams got their snapshot; {api.proc.tail(20)}"
        stop = many.run_in_background()
        try:
            times = []
            with httpx.Client(base_url=api.base, headers=api.auth, timeout=30) as client:
                client.get("/api/v1/me")
                for _ in range(150):
                    start = time.perf_counter()
                    response = client.get("/api/v1/me")
                    times.append(time.perf_counter() - start)
                    assert response.status_code == 200
            time.sleep(BLOCK_S + 1)  # every stream through one more block period
        finally:
            stop()
        times.sort()
        p99 = times[math.ceil(0.99 * len(times)) - 1]
        print(f"GET /api/v1/me with 500 open streams: p99 {p99 * 1000:.1f} ms, median {times[75] * 1000:.1f} ms")
        assert p99 < 0.2, (
            f"p99 of GET /api/v1/me with 500 open streams: {p99 * 1000:.0f} ms (median {times[75] * 1000:.0f} ms)"
        )
        assert many.wait_all(KEEPALIVE, 2 * BLOCK_S) == 500, "not every stream is still served"
        assert sum(UNAVAILABLE in d for d in many.data) == 0
        assert all(b"HTTP/1.1 200" in d[:20] for d in many.data)
    finally:
        if many is not None:
            many.close()
        api.proc.stop()
