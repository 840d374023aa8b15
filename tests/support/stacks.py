"""The service as the tests run it: a shared API + worker per database backend (``Service``), a
stack of processes one test may kill (``Stack``), the app in-process (``make_inprocess``), and
the small job bodies they run."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.processes import Proc, free_port, kill_group, spawn, wait_for_health

# Small jobs: a 2-block model, 4 windows of 32 tokens, 2 evaluation windows, on the CPU.
SMALL = {"nsamples": 4, "seqlen": 32}
TERMINAL = ("succeeded", "failed", "cancelled")
UPLOAD_LIMIT = 256 * 1024  # the shared service's upload cap


@dataclass
class Service:
    base: str
    env: dict[str, str]
    api: Proc
    worker: Proc
    client: httpx.Client
    logs: list[Proc] = field(default_factory=list)

    def wait_status(self, job_id: int, statuses: tuple[str, ...], timeout: float = 120, poll: float = 0.1) -> dict:
        """The job once its status is one of ``statuses`` (AssertionError with the worker's log after ``timeout``)."""
        deadline = time.monotonic() + timeout
        job: dict = {}
        while time.monotonic() < deadline:
            job = self.client.get(f"/api/v1/jobs/{job_id}").json()
            if job["status"] in statuses:
                return job
            time.sleep(poll)
        raise AssertionError(f"job {job_id} not {statuses} after {timeout}s: {job}\nworker log:\n{self.worker.tail()}")

    def wait_done(self, job_id: int, timeout: float = 120) -> dict:
        return self.wait_status(job_id, ("succeeded", "failed", "cancelled"), timeout, poll=0.2)


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
        self.api = spawn(
            ["serve", "--workers", "0", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            self.env,
            self.logs / f"api{n}.log",
        )
        wait_for_health(self.base, self.api)
        return self.api

    def start_worker(self, name: str) -> Proc:
        proc = spawn(
            ["worker", f"--hostname={name}@%h", "--loglevel=info"],
            self.env,
            self.logs / f"worker-{name}-{len(self.workers)}.log",
        )
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


def job_body(models_dir: Path, model: str = "llama", **changes) -> dict:
    body = {
        "model": str(models_dir / model),
        "sparsity": "2:4",
        "method": "sparsegpt",
        "calibration": {"dataset": str(models_dir / "calib.txt"), **SMALL},
        "evaluation": {"datasets": [str(models_dir / "calib.txt")], "max_windows": 2},
        "dtype": "float32",
    }
    body.update(changes)
    return body


def slow_body(models_dir: Path) -> dict:
    """A job long enough to kill mid-way on two shared CPU cores (8 blocks)."""
    return job_body(
        models_dir,
        model="llama-deep",
        calibration={"dataset": str(models_dir / "calib.txt"), "nsamples": 32, "seqlen": 64},
        evaluation={"datasets": [str(models_dir / "calib.txt")], "max_windows": 2},
    )


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
        _env_file=None,
        data_dir=data,
        database_url=team_pg,
        redis_url=module_redis.url,
        local_dirs=str(models_dir),
        queue=f"idle-{secrets.token_hex(3)}",
        auth="required",
        max_upload_bytes=64 * 1024,
        max_nsamples=256,
        max_seqlen=1024,
        max_active_jobs_per_user=3,
        sweep_interval_s=0,
        heartbeat_timeout_s=5,
        max_attempts=2,
        lost_message_grace_s=0,
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
