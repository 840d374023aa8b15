"""Resume with real processes: the pool process running a job is killed with SIGKILL at block k of
n; the redelivered attempt logs "resuming at block k", finishes, and its weights are those of an
uninterrupted run of the same job, bit for bit (CPU). The checkpoints are gone once the job ends."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.stacks import slow_body
from tests.worker.test_crash import BLOCKS_DEEP, assert_finished_once, worker_pid

pytestmark = pytest.mark.slow


def wait_block(stack, job_id: int, block: int, timeout: float = 180) -> None:
    """Until attempt 1 of the job is pruning block ``block`` or a later one."""
    deadline = time.monotonic() + timeout
    with stack.client() as c:
        while time.monotonic() < deadline:
            job = c.get(f"/api/v1/jobs/{job_id}").json()
            progress = job.get("progress") or {}
            if (
                job["status"] == "running"
                and progress.get("stage") == "pruning"
                and (progress.get("layer") or 0) >= block
            ):
                return
            assert job["status"] in ("queued", "running") and job["attempt"] <= 1, job
            time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached block {block}")


def wait_dead(pid: int, timeout: float = 10) -> None:
    """Until the killed process runs no more (gone, or a zombie its parent has not reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still running")


def artifact_weights(stack, job: dict) -> dict[str, torch.Tensor]:
    path = Path(stack.env["SPARSEGPT_DATA_DIR"]) / "artifacts" / str(job["id"]) / f"attempt-{job['attempt']}"
    return load_file(path / "model.safetensors")


def test_killed_at_block_k_resumes_there(make_stack, redis_server, models_dir):
    stack = make_stack(redis_server.url, max_attempts=2, heartbeat_timeout=120, sweep_interval_s=1)
    stack.start_api()
    worker = stack.start_worker("resume")
    body = slow_body(models_dir)
    with stack.client() as c:
        killed = c.post("/api/v1/jobs", json=body).json()["id"]
    resume_dir = Path(stack.env["SPARSEGPT_DATA_DIR"]) / "artifacts" / str(killed) / "resume"

    wait_block(stack, killed, 2)
    pid = worker_pid(stack.env["DATABASE_URL"], killed)
    os.kill(pid, signal.SIGKILL)
    wait_dead(pid)
    k = json.loads((resume_dir / "state.json").read_text())["next_block"]  # the blocks it had finished
    assert 2 <= k < BLOCKS_DEEP, k
    assert sorted(p.name for p in resume_dir.glob("block-*.safetensors")) == [
        f"block-{i:05d}.safetensors" for i in range(k)
    ]

    job = stack.wait(killed, timeout=300)
    assert_finished_once(stack, job, attempt=2)  # also: the job's directory holds only its artifact
    assert not resume_dir.exists(), "the checkpoints are removed when the job ends"
    log = worker.log.read_text()
    assert f"resuming at block {k} of {BLOCKS_DEEP}" in log, worker.tail()
    assert log.count("resuming at block") == 1

    with stack.client() as c:  # the same job, never interrupted
        whole = stack.wait(c.post("/api/v1/jobs", json=body).json()["id"], timeout=300)
    assert whole["status"] == "succeeded" and whole["attempt"] == 1
    assert "resuming at block" not in worker.log.read_text().split(f"resuming at block {k}", 1)[1]
    resumed, uninterrupted = artifact_weights(stack, job), artifact_weights(stack, whole)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    assert job["result"]["sparsity"] == whole["result"]["sparsity"]
    assert [(m["name"], m["sparsity"], m["error"]) for m in job["modules"]] == [
        (m["name"], m["sparsity"], m["error"]) for m in whole["modules"]
    ]
