"""The sweeper apart from the API: ``sparsegpt sweeper`` as a process, and the Redis lock that
lets one sweeper at a time work (the API's thread and any number of sweeper processes)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from sqlalchemy import create_engine, text

from app.sweeper import SweepLock
from tests.support.processes import spawn
from tests.support.stacks import job_body, slow_body


def test_one_sweeper_at_a_time_and_a_dead_holder_is_replaced(redis_server):
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    a = SweepLock(r, ttl_s=1.0, owner="a", key="t:lock")
    b = SweepLock(r, ttl_s=1.0, owner="b", key="t:lock")
    assert a.hold() and not b.hold() and a.holder() == "a"
    for _ in range(3):  # a renews past its ttl: b never gets it
        time.sleep(0.5)
        assert a.hold() and not b.hold()
    # a stops renewing (killed): b takes over once the key expires, and a does not get it back.
    deadline = time.monotonic() + 5
    while not b.hold():
        assert time.monotonic() < deadline, "the lock of a holder that stopped never expired"
        time.sleep(0.1)
    assert b.holder() == "b" and not a.hold()
    a.release()  # not a's: nothing happens
    assert b.holder() == "b"
    b.release()
    assert b.holder() is None and a.hold()


def job_row(database_url: str, job_id: int) -> dict:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT status, attempt, error FROM jobs WHERE id = :id"), {"id": job_id}).one()
            return dict(row._mapping)
    finally:
        engine.dispose()


def wait_row(database_url: str, job_id: int, status: str, timeout: float, procs=()) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = job_row(database_url, job_id)
        if row["status"] == status:
            return row
        time.sleep(0.3)
    tails = "\n".join(p.tail(30) for p in procs)
    raise AssertionError(f"job {job_id} not {status} after {timeout}s: {row}\n{tails}")


def start_worker_without_api(stack, name: str):
    """A worker, seen through its registration key (the API is down)."""
    proc = spawn(["worker", f"--hostname={name}@%h", "--loglevel=info"], stack.env, stack.logs / f"worker-{name}.log")
    stack.workers.append(proc)
    r = redis.Redis.from_url(stack.env["REDIS_URL"])
    deadline = time.monotonic() + 60
    while not any(k.decode().split(":")[-1].startswith(f"{name}@") for k in r.scan_iter(match="sparsegpt:worker:*")):
        assert proc.popen.poll() is None and time.monotonic() < deadline, proc.tail()
        time.sleep(0.2)
    return proc


@pytest.mark.slow
def test_api_down_lost_job_requeued_by_the_sweeper_process(make_stack, redis_server, models_dir):
    """kill -9 of the API and of the worker running a job: the `sparsegpt sweeper` process finds
    the expired heartbeat, requeues the job, and a new worker finishes it, with no API at all."""
    stack = make_stack(redis_server.url, max_attempts=3, heartbeat_timeout=4, sweep_interval_s=1)
    stack.start_api()
    worker = stack.start_worker("s1")
    sweeper = spawn(["sweeper"], stack.env, stack.logs / "sweeper.log")
    stack.workers.append(sweeper)  # stopped with the workers
    with stack.client() as c:
        job_id = c.post("/api/v1/jobs", json=slow_body(models_dir)).json()["id"]
    stack.wait_stage(job_id, "pruning")
    os.killpg(stack.api.popen.pid, signal.SIGKILL)
    stack.api.popen.wait(timeout=10)
    os.killpg(worker.popen.pid, signal.SIGKILL)
    worker.popen.wait(timeout=10)
    url = stack.env["DATABASE_URL"]
    row = wait_row(url, job_id, "queued", timeout=40, procs=[sweeper])
    assert row["attempt"] == 1 and "stopped sending heartbeats" in row["error"]
    assert f"job {job_id}: heartbeat expired" in sweeper.log.read_text()
    start_worker_without_api(stack, "s2")
    row = wait_row(url, job_id, "succeeded", timeout=240, procs=[sweeper, *stack.workers])
    assert row["attempt"] == 2 and row["error"] is None
    assert sweeper.popen.poll() is None, "the sweeper process still runs"
    # And with the API back, the sweeper process and the API's thread take turns (one lock).
    stack.start_api()
    with stack.client() as c:
        small = c.post("/api/v1/jobs", json=job_body(models_dir)).json()["id"]
    assert stack.wait(small, timeout=120)["status"] == "succeeded"
    holder = redis.Redis.from_url(stack.env["REDIS_URL"], decode_responses=True).get("sparsegpt:sweeper:lock")
    assert holder and holder.startswith("sweeper@"), holder


def test_sweeper_command_refuses_without_redis(tmp_path):
    import subprocess
    import sys

    from tests.support.paths import REPO
    from tests.support.processes import base_env

    env = base_env(SPARSEGPT_DATA_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "sweeper"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "REDIS_URL is not set" in done.stderr and "Traceback" not in done.stderr


def test_requeue_and_resend_go_to_the_jobs_own_queue(team_pg, module_redis, models_dir, tmp_path_factory):
    """A job routed to a per-memory queue is requeued (expired heartbeat) and re-sent (message
    lost) to that queue, never to the shared one, where a worker too small would take it."""
    from datetime import timedelta

    from app import crud, db
    from app.models import Job, utcnow
    from app.sweeper import broker_messages, sweep_once
    from tests.support.stacks import make_inprocess

    client, settings, tokens = make_inprocess(
        team_pg, module_redis, models_dir, tmp_path_factory, max_active_jobs_per_user=0
    )
    with client:
        r = client.app.state.redis
        response = client.post(
            "/api/v1/jobs",
            json={"model": "facebook/opt-125m", "sparsity": 0.5},
            headers={"Authorization": f"Bearer {tokens['alice']}"},
        )
        job_id = response.json()["id"]
        own = f"{settings.queue}.gpu40gb"
        with db.session_scope(settings.database) as session:
            session.get(Job, job_id).queue = own
            assert crud.claim_job(
                session, job_id=job_id, worker="gone@x", pid=1, stale_before=crud.stale_before(60), max_attempts=3
            ).claimed
            session.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=60)
        shared_before = broker_messages(r, settings.queue).count(f'"argsrepr": "[{job_id}]"')
        assert job_id in sweep_once(settings, client.app.state.sessions, r).requeued
        assert broker_messages(r, own).count(f'"argsrepr": "[{job_id}]"') == 1
        assert broker_messages(r, settings.queue).count(f'"argsrepr": "[{job_id}]"') == shared_before
        r.delete(own)  # the message lost (Redis restarted without persistence)
        assert job_id in sweep_once(settings, client.app.state.sessions, r).resent
        assert broker_messages(r, own).count(f'"argsrepr": "[{job_id}]"') == 1
