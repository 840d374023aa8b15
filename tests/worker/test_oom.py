"""A job too large for its worker ends failed after ONE attempt, with the numbers (issue 11, item 9).

Real processes (PostgreSQL, a redis-server of the test's own, `sparsegpt serve --workers 0`,
`sparsegpt worker`):

- the worker's own estimate, once the model is loaded and before calibrating: the API took the
  job for a GPU worker's fp16 (SPARSEGPT_WORKER_DEVICE=auto there), the worker runs it on the
  CPU in fp32, twice the activations: refused with the numbers, not retried;
- the soft memory guard (SPARSEGPT_WORKER_MAX_RSS_GB): the task process's memory goes above
  it, the job is failed with the reason and the process killed at once (SIGKILL, as the
  kernel's OOM killer would): the redelivered message finds the job finished, no 2nd attempt.

A person's kill -9 of the task process is still retried (tests/worker/test_crash.py). The
kernel's own OOM kill is told from that by its counters (cgroup memory.events / memory.oom_control,
/proc/vmstat): the readings and the rule are checked here on this machine's real files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.support.stacks import job_body
from worker.engine.contract.estimate import JobSize, estimate
from worker.memory import OomCounters, memory_limit, oom_counters, oom_evidence, oom_reason, process_memory

NSAMPLES, SEQLEN = 2048, 256


def _estimates(models_dir) -> tuple[float, float]:
    """(the API's view: fp16 on a GPU worker, converted from the fp32 files; the CPU worker's:
    fp32, the weights memory-mapped), in bytes."""
    config = json.loads((models_dir / "llama" / "config.json").read_text())
    sets = ((str(models_dir / "calib.txt"), (models_dir / "calib.txt").stat().st_size),)
    api = estimate(config, JobSize("sparsegpt", NSAMPLES, SEQLEN, "float16", "cuda", sets, 2, stored="float32"))
    cpu = estimate(
        config, JobSize("sparsegpt", NSAMPLES, SEQLEN, "float32", "cpu", sets, 2, mapped=True, stored="float32")
    )
    return api.total, cpu.total


@pytest.mark.slow
def test_the_worker_refuses_a_job_its_device_cannot_hold(make_stack, redis_server, models_dir):
    api_view, cpu_view = _estimates(models_dir)
    assert cpu_view > 1.3 * api_view
    limit_gb = round((api_view + cpu_view) / 2 / 1e9, 3)
    stack = make_stack(redis_server.url, max_attempts=3, max_job_memory_gb=limit_gb)
    stack.env["SPARSEGPT_WORKER_DEVICE"] = "auto"  # the API does not know its workers' devices
    stack.start_api()
    stack.env["SPARSEGPT_WORKER_DEVICE"] = "cpu"
    stack.start_worker("size")
    body = job_body(
        models_dir,
        calibration={"dataset": str(models_dir / "calib.txt"), "nsamples": NSAMPLES, "seqlen": SEQLEN},
        dtype="auto",
    )
    with stack.client() as c:
        response = c.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text  # fits the fp16 the API assumed
    job = stack.wait(response.json()["id"], timeout=120)
    assert job["status"] == "failed" and job["attempt"] == 1, job
    assert job["error"].startswith(
        "this job needs about 0.14 GB (calibration activations 0.13 GB = "
        f"{NSAMPLES} samples x {SEQLEN} tokens x 64 hidden x 4 bytes (float32)"
    ), job["error"]
    assert f"a worker gives a job at most {limit_gb:g} GB (SPARSEGPT_MAX_JOB_MEMORY_GB)" in job["error"]
    assert job["progress"]["stage"] == "loading", "refused before calibrating"
    assert "HF_TOKEN" not in job["error"]
    time.sleep(2)
    with stack.client() as c:
        again = c.get(f"/api/v1/jobs/{job['id']}").json()
    assert again["status"] == "failed" and again["attempt"] == 1


@pytest.mark.slow
def test_the_memory_guard_fails_the_job_after_one_attempt(make_stack, redis_server, models_dir):
    """The guard at 0.25 GB: the task process passes it once torch and the model are loaded."""
    stack = make_stack(
        redis_server.url, max_attempts=3, worker_max_rss_gb=0.25, heartbeat_timeout=60, sweep_interval_s=1
    )
    stack.start_api()
    worker = stack.start_worker("guard")
    with stack.client() as c:
        job_id = c.post("/api/v1/jobs", json=job_body(models_dir)).json()["id"]
    job = stack.wait(job_id, timeout=120)
    assert job["status"] == "failed" and job["attempt"] == 1, job
    assert job["error"].startswith("the job's worker process used "), job["error"]
    used = float(job["error"].split("used ")[1].split(" GB")[0])
    assert used >= 0.25
    assert "above this worker's limit of 0.25 GB (SPARSEGPT_WORKER_MAX_RSS_GB); stopped and not retried" in job["error"]

    # The process was really killed (the pool replaced it); the message that came back found
    # the job finished and did not start a second attempt.
    def logged(text: str) -> bool:
        deadline = time.monotonic() + 30
        while text not in worker.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        return text in worker.log.read_text()

    assert logged("exited prematurely: signal 9 (SIGKILL)"), worker.tail()
    assert logged(f"job {job_id} not run: job is already failed"), worker.tail()
    with stack.client() as c:
        again = c.get(f"/api/v1/jobs/{job_id}").json()
        assert again["status"] == "failed" and again["attempt"] == 1, again
        workers = c.get("/api/v1/health").json()["workers"]
    assert worker.popen.poll() is None and any(w["name"].startswith("guard@") for w in workers)
    partial = os.path.join(stack.env["SPARSEGPT_DATA_DIR"], "artifacts", str(job_id))
    assert not os.path.isdir(partial) or not any(name.endswith(".partial") for name in os.listdir(partial))


# --- the kernel's OOM kill: readings and the rule ------------------------------------------------------


def test_memory_readings_of_a_real_process():
    """A child that holds 200 MB: its resident and peak memory; the limit it runs under."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; b = bytearray(200 * 2**20); "
            "b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        rss, peak = process_memory(child.pid)
        assert 200 * 2**20 < rss <= peak < 400 * 2**20
    finally:
        child.kill()
        child.wait()
    assert process_memory(child.pid) is None  # gone
    limit = memory_limit()
    assert limit is not None and limit > 200 * 2**20
    counters = oom_counters()
    assert counters.system is None or counters.system >= 0
    assert counters.cgroup is None or counters.cgroup >= 0


def test_which_sigkill_is_an_oom_kill():
    gb = 10**9
    big = {"rss": 30 * gb, "peak": 31 * gb, "limit": 32 * gb}
    small = {"rss": 1 * gb, "peak": 2 * gb, "limit": 32 * gb}
    # The worker's cgroup counted an OOM kill while the job ran.
    assert oom_evidence(OomCounters(3, 7), OomCounters(4, 8), small)
    # No OOM kill counted anywhere: a person's kill -9, retried.
    assert oom_evidence(OomCounters(3, 7), OomCounters(3, 7), small) is None
    assert oom_evidence(OomCounters(None, 7), OomCounters(None, 7), small) is None
    assert oom_evidence(None, OomCounters(None, None), None) is None
    # Only the machine's counter: ours if the job held a large share of the memory.
    assert oom_evidence(OomCounters(None, 7), OomCounters(None, 8), {**small, "peak": 20 * gb})
    assert oom_evidence(OomCounters(None, 7), OomCounters(None, 8), small) is None
    # A cgroup counter that did not move wins over the machine's.
    assert oom_evidence(OomCounters(3, 7), OomCounters(3, 8), {**small, "peak": 20 * gb}) is None
    # The last reading at the limit.
    assert oom_evidence(OomCounters(3, 7), OomCounters(3, 7), {**big, "rss": 31 * gb})
    reason = oom_reason(big)
    assert reason.startswith(
        "the worker process was killed by the out-of-memory killer while running this job "
        "(peak ~31.0 GB of 32.0 GB); not retried"
    )
