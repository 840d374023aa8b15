"""Crash safety with real processes: PostgreSQL, a redis-server of the test's own, the API
(`sparsegpt serve --workers 0`) and Celery workers (`sparsegpt worker`), killed with SIGKILL.

- the pool process running a job killed: the message is delivered again, the job finishes once,
  attempt 2; killed at the attempt limit: failed with the reason;
- the whole worker killed (no redelivery before the visibility timeout): the sweeper finds the
  expired heartbeat and requeues it, or fails it past the limit;
- Redis killed and started again mid-job: the running job finishes with its results in the
  database, and the queued job whose message was lost is sent again;
- the API killed and started again: nothing lost, an SSE client resumes with Last-Event-ID.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.support.processes import read_sse
from tests.support.stacks import job_body, slow_body

pytestmark = pytest.mark.slow

BLOCKS_DEEP, LINEARS_PER_LLAMA_BLOCK = 8, 7


def worker_pid(database_url: str, job_id: int) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT worker_pid FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()
    finally:
        engine.dispose()


def wait_attempt_running(stack, job_id: int, attempt: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    with stack.client() as c:
        while time.monotonic() < deadline:
            response = c.get(f"/api/v1/jobs/{job_id}")
            assert response.status_code == 200, (response.status_code, dict(response.headers), response.text[:300])
            job = response.json()
            if (
                job["status"] == "running"
                and job["attempt"] == attempt
                and (job.get("progress") or {}).get("stage") == "pruning"
            ):
                return job
            assert job["status"] in ("queued", "running"), job
            time.sleep(0.1)
    raise AssertionError(f"job {job_id} attempt {attempt} never ran: {job}")


def partial_dirs(stack, job_id: int, wait_s: float = 10) -> list[str]:
    """What is left of the job's artifact directory, itself included (waiting a little: the row
    is marked failed first, then the leftovers are removed)."""
    job_dir = os.path.join(stack.env["SPARSEGPT_DATA_DIR"], "artifacts", str(job_id))
    deadline = time.monotonic() + wait_s
    while True:
        left = [job_dir, *sorted(os.listdir(job_dir))] if os.path.isdir(job_dir) else []
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def assert_finished_once(stack, job: dict, attempt: int) -> None:
    assert job["status"] == "succeeded", job
    assert job["attempt"] == attempt and job["error"] is None
    modules = job["modules"]
    assert len(modules) == BLOCKS_DEEP * LINEARS_PER_LLAMA_BLOCK, "results written once, not per attempt"
    assert {m["block"] for m in modules} == set(range(BLOCKS_DEEP))
    assert len(job["metrics"]) == 1 and job["metrics"][0]["perplexity"] > 1
    job_dir = os.path.join(stack.env["SPARSEGPT_DATA_DIR"], "artifacts", str(job["id"]))
    assert sorted(os.listdir(job_dir)) == [f"attempt-{attempt}"], "one artifact, no partial leftovers"
    with stack.client() as c:
        download = c.get(job["artifact"]["url"])
    assert download.status_code == 200 and len(download.content) == job["artifact"]["size"]


def test_sigkill_mid_job(make_stack, redis_server, models_dir):
    """The process running the job is killed: redelivered, finishes once (attempt 2). A job
    killed at each of its 2 allowed attempts ends failed with the reason."""
    stack = make_stack(redis_server.url, max_attempts=2, heartbeat_timeout=120, sweep_interval_s=1)
    stack.start_api()
    stack.start_worker("k1")
    with stack.client() as c:
        first = c.post("/api/v1/jobs", json=slow_body(models_dir)).json()["id"]

    wait_attempt_running(stack, first, 1)
    pid = worker_pid(stack.env["DATABASE_URL"], first)
    os.kill(pid, signal.SIGKILL)
    job = stack.wait(first, timeout=240)
    assert_finished_once(stack, job, attempt=2)
    assert (
        "WorkerLostError" in stack.workers[0].log.read_text()
        or "exited prematurely" in stack.workers[0].log.read_text()
    )

    with stack.client() as c:
        second = c.post("/api/v1/jobs", json=slow_body(models_dir)).json()["id"]
    for attempt in (1, 2):
        wait_attempt_running(stack, second, attempt, timeout=180)
        os.kill(worker_pid(stack.env["DATABASE_URL"], second), signal.SIGKILL)
    job = stack.wait(second, timeout=120)
    assert job["status"] == "failed" and job["attempt"] == 2, job
    assert "gave up after 2 attempt(s)" in job["error"] and "attempt limit 2" in job["error"]
    assert job["artifact"] is None
    assert partial_dirs(stack, second) == [], "the killed attempts' unfinished outputs are removed"
    # The worker survived its pool process being killed, and still takes jobs.
    with stack.client() as c:
        small = c.post("/api/v1/jobs", json=job_body(models_dir)).json()["id"]
    assert stack.wait(small, timeout=120)["status"] == "succeeded"


def test_whole_worker_killed_heartbeat_sweeper(make_stack, redis_server, models_dir):
    """kill -9 of the worker's whole process group: no redelivery comes (the message waits for
    the visibility timeout), the expired heartbeat is found and the job requeued; at the limit it fails."""
    stack = make_stack(redis_server.url, max_attempts=2, heartbeat_timeout=4, sweep_interval_s=1)
    stack.start_api()
    first_worker = stack.start_worker("v1")
    with stack.client() as c:
        job_id = c.post("/api/v1/jobs", json=slow_body(models_dir)).json()["id"]
    wait_attempt_running(stack, job_id, 1)
    os.killpg(first_worker.popen.pid, signal.SIGKILL)
    first_worker.popen.wait(timeout=10)
    # No worker at all: the sweeper requeues it once the heartbeat is 4 s old.
    requeued = stack.wait(job_id, statuses=("queued",), timeout=30)
    assert requeued["attempt"] == 1 and "stopped sending heartbeats" in requeued["error"]
    second_worker = stack.start_worker("v2")
    wait_attempt_running(stack, job_id, 2, timeout=120)
    os.killpg(second_worker.popen.pid, signal.SIGKILL)
    second_worker.popen.wait(timeout=10)
    job = stack.wait(job_id, timeout=30)
    assert job["status"] == "failed" and job["attempt"] == 2
    assert "gave up after 2 attempt(s)" in job["error"] and "stopped sending heartbeats" in job["error"]
    assert partial_dirs(stack, job_id) == [], "the killed attempts' unfinished outputs are removed"
    # Nothing stays running; a new worker still runs new work.
    stack.start_worker("v3")
    with stack.client() as c:
        small = c.post("/api/v1/jobs", json=job_body(models_dir)).json()["id"]
        assert stack.wait(small, timeout=120)["status"] == "succeeded"
        assert c.get("/api/v1/jobs", params={"status": "running"}).json()["total"] == 0


def test_redis_restarted_mid_job(make_stack, redis_server, models_dir):
    """Redis killed (nothing saved) and started again while a job runs and another waits."""
    stack = make_stack(redis_server.url, heartbeat_timeout=60, sweep_interval_s=1, lost_message_grace_s=3)
    stack.start_api()
    stack.start_worker("r1")
    longer = slow_body(models_dir)
    longer["calibration"].update(nsamples=128, seqlen=128)
    with stack.client() as c:
        running = c.post("/api/v1/jobs", json=longer).json()["id"]
        waiting = c.post("/api/v1/jobs", json=job_body(models_dir)).json()["id"]
    wait_attempt_running(stack, running, 1)
    redis_server.kill()
    with stack.client() as c:  # the API answers from the database meanwhile
        assert c.get(f"/api/v1/jobs/{running}").json()["status"] == "running"
        assert c.get("/health").status_code == 503
    time.sleep(1.5)
    redis_server.start()
    with stack.client() as c:
        assert c.get(f"/api/v1/jobs/{running}").json()["status"] == "running", "Redis came back mid-job"
    job = stack.wait(running, timeout=240)
    assert_finished_once(stack, job, attempt=1)
    later = stack.wait(waiting, timeout=180)
    assert later["status"] == "succeeded" and later["attempt"] == 1 and later["metrics"]
    api_log = stack.api.log.read_text()
    assert f"job {waiting}: its run message" in api_log and "sent it again" in api_log


def test_api_restarted_sse_resumes(make_stack, redis_server, models_dir):
    """kill -9 of the API mid-job, then start it again: the job and its events are all there,
    and an SSE client that reconnects with Last-Event-ID gets the rest, in order, once."""
    stack = make_stack(redis_server.url, heartbeat_timeout=60)
    stack.start_api()
    stack.start_worker("a1")
    with stack.client() as c:
        before = c.get("/api/v1/jobs", params={"limit": 200}).json()["total"]
        job_id = c.post("/api/v1/jobs", json=slow_body(models_dir)).json()["id"]
    seen: list[dict] = []
    with stack.client(timeout=httpx.Timeout(30, read=60)) as c:
        with c.stream("GET", f"/api/v1/jobs/{job_id}/events") as stream:
            for event in read_sse(stream):
                seen.append(event)
                if event["event"] == "progress" and event["data"]["stage"] == "pruning":
                    break
    os.killpg(stack.api.popen.pid, signal.SIGKILL)
    stack.api.popen.wait(timeout=10)
    time.sleep(1)
    stack.start_api()
    rest: list[dict] = []
    with stack.client(timeout=httpx.Timeout(30, read=120)) as c:
        with c.stream("GET", f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": seen[-1]["id"]}) as stream:
            rest = list(read_sse(stream))
        assert rest[-1]["event"] == "status" and rest[-1]["data"]["status"] == "succeeded"
        with c.stream("GET", f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "0"}) as stream:
            replay = list(read_sse(stream))
        key = lambda event_id: tuple(int(x) for x in event_id.split("-"))  # noqa: E731
        ids = [e["id"] for e in seen[1:] + rest]
        assert ids == [e["id"] for e in replay if key(e["id"]) > key(seen[0]["id"])], "a gap or a repeat"
        assert len(set(ids)) == len(ids) and ids == sorted(ids, key=key)
        assert c.get("/api/v1/jobs", params={"limit": 200}).json()["total"] == before + 1
        assert c.get(f"/api/v1/jobs/{job_id}").json()["status"] == "succeeded"
