"""Per-block checkpoints through the shared store: the worker running a job is killed (kill -9 of
its whole process group, as a machine lost) after some blocks; another worker, with a data
directory of its own, fetches the checkpoint from the store and resumes at the block the store
holds, instead of starting over; the job finishes once and its checkpoints leave the store."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from tests.support.cluster import s3_bucket, start_worker
from tests.support.stacks import slow_body

pytestmark = pytest.mark.slow
BUCKET = "sparsegpt-checkpoints"
BLOCKS_DEEP, LINEARS_PER_LLAMA_BLOCK = 8, 7


@pytest.fixture
def s3(tmp_path):
    with s3_bucket(tmp_path / "s3", BUCKET) as server:
        yield server


def stored_state(s3, job_id: int) -> dict | None:
    try:
        body = s3.client().get_object(Bucket=BUCKET, Key=f"c/checkpoints/{job_id}/state.json")["Body"].read()
    except Exception:
        return None
    return json.loads(body)


def test_a_lost_machines_job_resumes_on_another_from_the_store(make_stack, redis_server, models_dir, s3, tmp_path):
    stack = make_stack(redis_server.url, storage_url=f"s3://{BUCKET}/c", heartbeat_timeout=4, sweep_interval_s=1)
    stack.env.update(s3.env())
    stack.start_api()
    first = start_worker(stack, "first", SPARSEGPT_DATA_DIR=str(tmp_path / "machine-1"))
    body = slow_body(models_dir)
    body["calibration"].update(
        nsamples=256, seqlen=128
    )  # long enough for the 0.5 s store sync to show block 2 (a 4 s job did not)
    with stack.client() as c:
        job_id = c.post("/api/v1/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 180
    while True:
        state = stored_state(s3, job_id)
        if state and state["next_block"] >= 2:
            break
        assert time.monotonic() < deadline, first.tail()
        time.sleep(0.1)
    os.killpg(first.popen.pid, signal.SIGKILL)
    first.popen.wait(timeout=10)
    k = stored_state(s3, job_id)["next_block"]
    assert 2 <= k < BLOCKS_DEEP, k
    names = set(s3.keys(BUCKET, f"c/checkpoints/{job_id}/"))
    assert {f"c/checkpoints/{job_id}/block-{i:05d}.safetensors" for i in range(k)} <= names
    second = start_worker(stack, "second", SPARSEGPT_DATA_DIR=str(tmp_path / "machine-2"))
    job = stack.wait(job_id, timeout=300)
    assert job["status"] == "succeeded" and job["attempt"] == 2 and job["worker"].startswith("second@"), job
    assert len(job["modules"]) == BLOCKS_DEEP * LINEARS_PER_LLAMA_BLOCK, "each module recorded once"
    log = second.log.read_text()
    assert "fetched its checkpoint" in log, second.tail()
    assert re.search(rf"resuming at block {k} of {BLOCKS_DEEP}", log), second.tail()
    assert s3.keys(BUCKET, f"c/checkpoints/{job_id}/") == [], "the job ended: its checkpoints left the store"
