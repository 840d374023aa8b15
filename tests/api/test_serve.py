"""`sparsegpt serve` with nothing configured: its own Redis, SQLite in the data directory,
migrations, one local worker, the API; a job end to end; a clean stop on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.support.paths import REPO
from tests.support.processes import free_port, read_sse
from tests.support.stacks import SMALL

pytestmark = pytest.mark.slow


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    found = {int(p) for p in out.split()}
    for child in list(found):
        found |= _children(child)
    return found


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs a redis-server binary")
def test_serve_with_nothing_configured(models_dir, calib_bytes, tmp_path):
    data = tmp_path / "data"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SPARSEGPT_") and k not in ("REDIS_URL", "DATABASE_URL")
    }
    env.update(
        SPARSEGPT_DATA_DIR=str(data),
        SPARSEGPT_LOCAL_DIRS=str(models_dir),
        SPARSEGPT_WORKER_DEVICE="cpu",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        health: dict = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                health = httpx.get(f"{base}/health", timeout=2).json()
                if health.get("workers"):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert health.get("status") == "ok", health
        assert (data / "sparsegpt.db").exists()
        children = _children(proc.pid)
        assert any(
            "redis-server" in open(f"/proc/{p}/cmdline").read() for p in children if os.path.exists(f"/proc/{p}")
        )

        with httpx.Client(base_url=base, timeout=60) as client:
            ref = client.post("/api/v1/calibration-sets", files={"file": ("c.txt", calib_bytes)}).json()["ref"]
            response = client.post(
                "/api/v1/jobs",
                json={
                    "model": str(models_dir / "llama"),
                    "sparsity": 0.5,
                    "method": "wanda",
                    "calibration": {"dataset": ref, **SMALL},
                    "evaluation": {"datasets": [ref], "max_windows": 2},
                },
            )
            assert response.status_code == 201, response.text
            job_id = response.json()["id"]
            with client.stream("GET", f"/api/v1/jobs/{job_id}/events", timeout=120) as stream:
                events = list(read_sse(stream))
            assert events[0]["event"] == "snapshot" and events[-1]["data"]["status"] == "succeeded"
            job = client.get(f"/api/v1/jobs/{job_id}").json()
            assert job["status"] == "succeeded" and job["metrics"][0]["perplexity"] > 1
            assert job["result"]["sparsity"] == pytest.approx(0.5, abs=0.01)
            download = client.get(f"/api/v1/jobs/{job_id}/artifact")
            assert download.status_code == 200 and len(download.content) == job["artifact"]["size"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    time.sleep(0.5)
    alive = [
        p for p in children if os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read().lower()
    ]
    assert alive == [], "children left running after SIGTERM"
