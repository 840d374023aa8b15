"""Fixtures for the team-server tests: real PostgreSQL, redis-server processes of our own (so a
test may stop and restart one), the API (`sparsegpt serve`) and Celery workers (`sparsegpt
worker`) as processes that a test may kill -9.

- PostgreSQL from SPARSEGPT_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test):
  a database of its own per session, dropped after.
- redis-server from PATH, on a free loopback port, without persistence (a restart loses
  everything, the worst case).
"""

from __future__ import annotations

import os
import secrets
import shutil
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
from tests.service.conftest import REPO, Proc, free_port, spawn, wait_for_health

SMALL = {"nsamples": 4, "seqlen": 32}
TERMINAL = ("succeeded", "failed", "cancelled")


class RedisServer:
    """A redis-server of our own: start, stop (SIGKILL: nothing saved), start again on the same port."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start")
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_binary() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("needs a redis-server binary on PATH")


@pytest.fixture
def redis_server(redis_binary, tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def team_pg() -> Iterator[str]:
    """A PostgreSQL database of its own, dropped at the end of the session."""
    with scratch_database("sparsegpt_team") as url:
        yield url


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The allowed local directory: a tiny LLaMA, a deeper one (slow enough to kill mid-job), text."""
    from tests.tiny_models import make_tiny_model, sample_text

    root = tmp_path_factory.mktemp("team-models")
    make_tiny_model(root / "llama")
    make_tiny_model(root / "llama-deep", blocks=8, hidden=128)
    (root / "calib.txt").write_text(sample_text(12_000), encoding="utf-8")
    return root


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEGPT_") and k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               SPARSEGPT_WORKER_DEVICE="cpu")
    env.update(extra)
    return env


def add_user(env: dict[str, str], name: str, admin: bool = False) -> str:
    """`sparsegpt users add NAME`: the token is the last line of its output."""
    args = [sys.executable, "-m", "app.cli", "users", "add", name] + (["--admin"] if admin else [])
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1]


@dataclass
class Stack:
    """The API and its workers as processes, for one test."""

    env: dict[str, str]
    logs: Path
    port: int = field(default_factory=free_port)
    api: Proc | None = None
    workers: list[Proc] = field(default_factory=list)
    token: str = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None = None, **kwargs) -> httpx.Client:
        token = self.token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs.setdefault("timeout", 30)
        return httpx.Client(base_url=self.base, headers=headers, **kwargs)

    def start_api(self) -> Proc:
        n = sum(1 for _ in self.logs.glob("api*.log"))
        self.api = spawn(["serve", "--workers", "0", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
                         self.env, self.logs / f"api{n}.log")
        wait_for_health(self.base, self.api)
        return self.api

    def start_worker(self, name: str) -> Proc:
        proc = spawn(["worker", f"--hostname={name}@%h", "--loglevel=info"], self.env, self.logs / f"worker-{name}-{len(self.workers)}.log")
        self.workers.append(proc)
        with self.client() as c:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert proc.popen.poll() is None, proc.tail()
                body = c.get("/api/v1/health").json()
                if any(w["name"].startswith(f"{name}@") and w["pid"] for w in body.get("workers", [])):
                    return proc
                time.sleep(0.2)
        raise RuntimeError(f"worker {name} not seen:\n{proc.tail()}")

    def stop(self) -> None:
        for proc in self.workers:
            kill_group(proc)
        if self.api is not None:
            self.api.stop()

    def wait(self, job_id: int, statuses=TERMINAL, timeout: float = 180, token: str | None = None) -> dict:
        deadline = time.monotonic() + timeout
        job: dict = {}
        with self.client(token) as c:
            while time.monotonic() < deadline:
                try:
                    job = c.get(f"/api/v1/jobs/{job_id}").json()
                except (httpx.HTTPError, ValueError):
                    time.sleep(0.3)
                    continue
                if job.get("status") in statuses:
                    return job
                time.sleep(0.2)
        tails = "\n".join(p.tail(30) for p in self.workers)
        raise AssertionError(f"job {job_id} not {statuses} after {timeout}s: {job}\n{tails}")

    def wait_stage(self, job_id: int, stage: str = "pruning", timeout: float = 120) -> dict:
        """Until the job runs and its progress reached ``stage``."""
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                job = c.get(f"/api/v1/jobs/{job_id}").json()
                if job["status"] == "running" and (job.get("progress") or {}).get("stage") == stage:
                    return job
                assert job["status"] in ("queued", "running"), job
                time.sleep(0.1)
        raise AssertionError(f"job {job_id} never reached {stage}")


def kill_group(proc: Proc) -> None:
    if proc.popen.poll() is None:
        try:
            os.killpg(proc.popen.pid, signal.SIGTERM)
            proc.popen.wait(timeout=10)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.popen.wait(timeout=10)


@pytest.fixture
def make_stack(team_pg, models_dir, tmp_path) -> Iterator:
    """make_stack(redis_url, **settings) -> a Stack with its environment (no process started)."""
    stacks: list[Stack] = []

    def make(redis_url: str, **settings: str) -> Stack:
        data = tmp_path / f"data{len(stacks)}"
        env = base_env(
            SPARSEGPT_DATA_DIR=str(data), DATABASE_URL=team_pg, REDIS_URL=redis_url,
            SPARSEGPT_LOCAL_DIRS=str(models_dir), SPARSEGPT_QUEUE=f"team-{secrets.token_hex(3)}",
            SPARSEGPT_AUTH="required", SPARSEGPT_HEARTBEAT_INTERVAL_S="0.5", SPARSEGPT_MIN_FREE_DISK_MB="1",
        )
        env.update({f"SPARSEGPT_{k.upper()}": str(v) for k, v in settings.items()})
        logs = tmp_path / f"logs{len(stacks)}"
        logs.mkdir()
        stack = Stack(env, logs)
        stack.token = add_user(env, f"admin{secrets.token_hex(3)}", admin=True)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


def job_body(models_dir: Path, model: str = "llama", **changes) -> dict:
    body = {
        "model": str(models_dir / model), "sparsity": "2:4", "method": "sparsegpt",
        "calibration": {"dataset": str(models_dir / "calib.txt"), **SMALL},
        "evaluation": {"datasets": [str(models_dir / "calib.txt")], "max_windows": 2},
        "dtype": "float32",
    }
    body.update(changes)
    return body


def slow_body(models_dir: Path) -> dict:
    """A job long enough to kill mid-way on two shared CPU cores (8 blocks)."""
    return job_body(models_dir, model="llama-deep", calibration={"dataset": str(models_dir / "calib.txt"), "nsamples": 32, "seqlen": 64},
                    evaluation={"datasets": [str(models_dir / "calib.txt")], "max_windows": 2})


@pytest.fixture(scope="module")
def module_redis(redis_binary, tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@dataclass
class InProcess:
    """The app in-process (TestClient) on PostgreSQL and a Redis of its own; no worker."""

    client: object
    settings: object
    tokens: dict[str, str]

    def as_(self, name: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"} if name else {}


def make_inprocess(team_pg, module_redis, models_dir, tmp_path_factory, **overrides):
    from fastapi.testclient import TestClient

    from app import auth, crud, db
    from app.config import Settings
    from app.main import create_app

    data = tmp_path_factory.mktemp("inproc-data")
    values = dict(
        _env_file=None, data_dir=data, database_url=team_pg, redis_url=module_redis.url,
        local_dirs=str(models_dir), queue=f"idle-{secrets.token_hex(3)}", auth="required",
        max_upload_bytes=64 * 1024, max_nsamples=256, max_seqlen=1024, max_active_jobs_per_user=3,
        sweep_interval_s=0, heartbeat_timeout_s=5, max_attempts=2, lost_message_grace_s=0,
    )
    values.update(overrides)
    settings = Settings(**values)
    db.migrate(settings.database)
    tokens = {}
    with db.session_scope(settings.database) as session:
        for name, admin in (("alice", False), ("bob", False), ("root", True)):
            name = f"{name}-{secrets.token_hex(2)}" if crud.get_user_by_name(session, name) else name
            token = "sgpt_" + secrets.token_urlsafe(32)
            crud.create_user(session, name=name, token_hash=auth.hash_token(token), is_admin=admin)
            tokens[name.split("-")[0]] = token
    return TestClient(create_app(settings, migrate=False), follow_redirects=False), settings, tokens
