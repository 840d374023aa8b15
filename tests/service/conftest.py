"""Fixtures for the service tests: real PostgreSQL, SQLite, Redis and Celery worker processes.

- ``backend``: "sqlite" or "postgresql" (a fresh database ``sparsegpt_test_<random>`` created on
  the server for the session and dropped after). PostgreSQL comes from
  SPARSEGPT_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test).
- Redis from SPARSEGPT_TEST_REDIS_URL (default redis://127.0.0.1:6379): database 13 for
  SQLite runs, 14 for PostgreSQL ones, flushed at the start; queues get a random name.
- ``service``: the API (``sparsegpt serve --workers 0``) and one worker (``sparsegpt worker``)
  as subprocesses, shared by every test of a backend.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.pg import scratch_database

REPO = Path(__file__).resolve().parents[2]
REDIS_BASE = os.environ.get("SPARSEGPT_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
REDIS_DB = {"sqlite": 13, "postgresql": 14}
UPLOAD_LIMIT = 256 * 1024

# Small jobs: a 2-block model, 4 windows of 32 tokens, 2 evaluation windows, on the CPU.
SMALL = {"nsamples": 4, "seqlen": 32}


def _redis_url(backend: str) -> str:
    return f"{REDIS_BASE}/{REDIS_DB[backend]}"


@pytest.fixture(scope="session")
def redis_available() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_BASE + "/0", socket_connect_timeout=2).ping()
    except redis.RedisError as err:
        pytest.skip(f"no Redis at {REDIS_BASE} ({err}); set SPARSEGPT_TEST_REDIS_URL")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A database of its own on the PostgreSQL server, dropped at the end of the session."""
    with scratch_database("sparsegpt_test") as url:
        yield url


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The allowed local directory: a tiny LLaMA, a bigger one for cancelling, a text file."""
    from tests.tiny_models import make_tiny_model, sample_text

    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root / "llama")
    make_tiny_model(root / "llama-deep", blocks=8, hidden=128)
    (root / "calib.txt").write_text(sample_text(12_000), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def calib_bytes(models_dir) -> bytes:
    return (models_dir / "calib.txt").read_bytes()


@pytest.fixture(scope="session")
def service_env(backend, redis_available, models_dir, tmp_path_factory, request) -> dict[str, str]:
    """Environment for this backend's API and worker processes (and its in-process Settings)."""
    import redis

    data = tmp_path_factory.mktemp(f"data-{backend}")
    if backend == "postgresql":
        database = request.getfixturevalue("pg_database")
    else:
        database = f"sqlite:///{data / 'sparsegpt.db'}"
    redis.Redis.from_url(_redis_url(backend)).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEGPT_")}
    env.update(
        SPARSEGPT_DATA_DIR=str(data),
        DATABASE_URL=database,
        REDIS_URL=_redis_url(backend),
        SPARSEGPT_LOCAL_DIRS=str(models_dir),
        SPARSEGPT_QUEUE=f"test-{backend}-{secrets.token_hex(3)}",
        SPARSEGPT_WORKER_DEVICE="cpu",
        SPARSEGPT_HEARTBEAT_INTERVAL_S="0.5",
        SPARSEGPT_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
        SPARSEGPT_MAX_NSAMPLES="512",
        SPARSEGPT_MAX_SEQLEN="4096",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    return env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Proc:
    popen: subprocess.Popen
    log: Path

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)


def spawn(args: list[str], env: dict[str, str], log: Path) -> Proc:
    handle = log.open("wb")
    popen = subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    handle.close()
    return Proc(popen, log)


def wait_for_health(base: str, proc: Proc, *, worker: str | None = None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"process exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            response = httpx.get(f"{base}/health", timeout=2)
            body = response.json()
            if response.status_code == 200 and (worker is None or any(w["name"].startswith(worker) for w in body["workers"])):
                return body
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not healthy after {timeout}s: {body}\n{proc.tail()}")


@dataclass
class Service:
    base: str
    env: dict[str, str]
    api: Proc
    worker: Proc
    client: httpx.Client
    logs: list[Proc] = field(default_factory=list)

    def wait_done(self, job_id: int, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/api/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not finished after {timeout}s: {job}\nworker log:\n{self.worker.tail()}")


@pytest.fixture(scope="session")
def service(backend, service_env, tmp_path_factory) -> Iterator[Service]:
    """The API and one worker for this backend, as real processes."""
    logs = tmp_path_factory.mktemp(f"logs-{backend}")
    port = free_port()
    api = spawn(["serve", "--workers", "0", "--port", str(port), "--log-level", "warning"], service_env, logs / "api.log")
    base = f"http://127.0.0.1:{port}"
    worker = None
    try:
        wait_for_health(base, api)
        worker = spawn(["worker", f"--hostname=test-{backend}@%h", "--loglevel=info"], service_env, logs / "worker.log")
        wait_for_health(base, worker, worker=f"test-{backend}@")
        with httpx.Client(base_url=base, timeout=30) as client:
            yield Service(base, service_env, api, worker, client)
    finally:
        if worker is not None:
            worker.stop()
        api.stop()


def read_sse(response: httpx.Response) -> Iterator[dict]:
    """Parse a text/event-stream response into {"id", "event", "data"} dicts (data parsed)."""
    event: dict = {}
    for line in response.iter_lines():
        if line == "":
            if "data" in event:
                event["data"] = json.loads(event["data"])
                yield event
            event = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "data":
            event["data"] = event.get("data", "") + value
        elif key in ("id", "event"):
            event[key] = value
