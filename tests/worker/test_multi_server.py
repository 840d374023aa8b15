"""The evidence for several GPU servers, every part a real process: PostgreSQL, Redis, an S3 server
(moto), the API, a sweeper of its own, and two workers with their own data directories (as on
two machines) advertising a 24 GB and an 80 GB GPU. A job that needs 40 GB runs on the 80 GB
worker; a job either can run survives kill -9 of the worker running it (the sweeper requeues it,
the other worker finishes it, once); both archives download through the API from the store with
the sha256 their jobs record."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.cluster import s3_bucket, start_worker
from tests.support.processes import spawn
from tests.support.stacks import job_body, slow_body

pytestmark = pytest.mark.slow
BUCKET = "sparsegpt-evidence"
BLOCKS_DEEP, LINEARS_PER_LLAMA_BLOCK = 8, 7


@pytest.fixture
def s3(tmp_path):
    with s3_bucket(tmp_path / "s3", BUCKET) as server:
        yield server


def running_on(stack, job_id: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    with stack.client() as c:
        while time.monotonic() < deadline:
            job = c.get(f"/api/v1/jobs/{job_id}").json()
            if job["status"] == "running" and (job.get("progress") or {}).get("stage") == "pruning":
                return job
            assert job["status"] in ("queued", "running"), job
            time.sleep(0.1)
    raise AssertionError(f"job {job_id} never ran")


def download_sha(stack, job: dict) -> str:
    with stack.client() as c:
        response = c.get(job["artifact"]["url"])
    assert response.status_code == 200 and len(response.content) == job["artifact"]["size"]
    return hashlib.sha256(response.content).hexdigest()


def test_two_gpu_servers_shared_store_routing_and_a_killed_worker(make_stack, redis_server, models_dir, s3, tmp_path):
    stack = make_stack(
        redis_server.url, storage_url=f"s3://{BUCKET}/prod", heartbeat_timeout=4, sweep_interval_s=1, max_attempts=3
    )
    stack.env.update(s3.env())
    assert stack.env["DATABASE_URL"].startswith("postgresql")
    stack.start_api()
    sweeper = spawn(["sweeper"], stack.env, stack.logs / "sweeper.log")
    workers = {
        "small": start_worker(
            stack,
            "small",
            "--gpu-memory-gb=24",
            "--gpu-name=Test 24GB",
            SPARSEGPT_DATA_DIR=str(tmp_path / "server-small"),
        ),
        "big": start_worker(
            stack, "big", "--gpu-memory-gb=80", "--gpu-name=Test 80GB", SPARSEGPT_DATA_DIR=str(tmp_path / "server-big")
        ),
    }
    stack.workers.append(sweeper)
    with stack.client() as c:
        listed = {w["name"].split("@")[0]: w["memory_gb"] for w in c.get("/api/v1/workers").json()["items"]}
        assert listed == {"small": 24, "big": 80}
        big_job = c.post("/api/v1/jobs", json={**job_body(models_dir), "resources": {"min_gpu_memory_gb": 40}})
        assert big_job.status_code == 201, big_job.text
        too_big = c.post("/api/v1/jobs", json={**job_body(models_dir), "resources": {"min_gpu_memory_gb": 200}})
        assert too_big.status_code == 422 and "80 GB" in too_big.text
    fitted = stack.wait(big_job.json()["id"], timeout=180)
    assert fitted["status"] == "succeeded" and fitted["worker"].startswith("big@"), fitted
    assert download_sha(stack, fitted) == fitted["artifact"]["sha256"]

    # A job either worker can run; kill -9 the whole worker running it (as a machine lost).
    with stack.client() as c:
        job_id = c.post("/api/v1/jobs", json=slow_body(models_dir)).json()["id"]
    first = running_on(stack, job_id)
    victim = first["worker"].split("@")[0]
    survivor = "big" if victim == "small" else "small"
    os.killpg(workers[victim].popen.pid, signal.SIGKILL)
    workers[victim].popen.wait(timeout=10)
    job = stack.wait(job_id, timeout=300)
    assert job["status"] == "succeeded" and job["attempt"] == 2 and job["worker"].startswith(f"{survivor}@"), job
    assert len(job["modules"]) == BLOCKS_DEEP * LINEARS_PER_LLAMA_BLOCK, "its results recorded once"
    assert download_sha(stack, job) == job["artifact"]["sha256"]
    assert f"job {job_id}: heartbeat expired" in (sweeper.log.read_text() + stack.api.log.read_text())
    keys = s3.keys(BUCKET, "prod/artifacts/")
    assert f"prod/artifacts/{job_id}/sparsegpt-job-{job_id}.tar" in keys
    assert not any(p.name.endswith(".tar") for p in Path(tmp_path).rglob("*.tar")), "no archive on any disk"
