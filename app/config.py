"""The service's settings: one pydantic-settings ``Settings``, read from the environment and .env.

The names people set are the ones in README: DATABASE_URL, REDIS_URL, SPARSEGPT_DATA_DIR,
SPARSEGPT_LOCAL_DIRS; every other knob is ``SPARSEGPT_<FIELD>``.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SPARSEGPT_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    # Where the SQLite file, uploads and artifacts live (with storage_url: local scratch space).
    data_dir: Path = Path("data")
    # Unset: uploads and artifacts in data_dir. s3://bucket/prefix: in that S3-compatible store,
    # shared by the API and every worker (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...; app/storage.py).
    storage_url: str = ""
    # None: a SQLite file in data_dir. PostgreSQL: postgresql+psycopg://user:pw@host/db
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "SPARSEGPT_DATABASE_URL")
    )
    # None: `sparsegpt serve` starts a redis-server of its own and sets REDIS_URL for its children.
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL", "SPARSEGPT_REDIS_URL"))
    # ':'-separated directories whose models and text files jobs may name (resolved, symlinks too).
    local_dirs: str = ""
    # ':'-separated directories of lm-eval task YAML files whose tasks jobs' evaluation.tasks may name
    # beside the harness's own (SPARSEGPT_EVAL_INCLUDE_DIRS, read by the workers). A task file can run
    # Python (`!function`) and read any file its data_files name: only directories the admin controls.
    eval_include_dirs: str = ""
    # Custom modelling code from the hub runs arbitrary Python on the workers: off by default.
    allow_trust_remote_code: bool = False

    # The Celery queue every worker consumes (a worker may consume per-GPU queues as well).
    queue: str = "sparsegpt"
    # Longest a job may run; the broker's visibility timeout is set above it, or Redis would
    # hand a still-running job to a second worker.
    job_time_limit_s: int = 48 * 3600
    # Deliveries of one job before it ends `failed` (a worker killed mid-job counts one).
    max_attempts: int = 3
    # A running job's worker writes its heartbeat this often; older than the timeout = dead.
    heartbeat_interval_s: float = 10.0
    heartbeat_timeout_s: float = Field(
        default=120.0,
        validation_alias=AliasChoices("SPARSEGPT_HEARTBEAT_TIMEOUT", "SPARSEGPT_HEARTBEAT_TIMEOUT_S"),
    )

    # The engine's device on the workers: auto (CUDA when there is one) | cpu | cuda | cuda:N.
    worker_device: str = "auto"
    # What a worker advertises instead of what nvidia-smi reads (`sparsegpt worker --gpu-memory-gb`):
    # GPU memory in GB (0: read it) and the GPU's name. Jobs are routed by it (app/services/routing.py).
    worker_gpu_memory_gb: float = 0.0
    worker_gpu_name: str = ""

    # Request limits.
    max_upload_bytes: int = 64 * 1024 * 1024
    max_nsamples: int = 4096
    max_seqlen: int = 32768
    max_eval_sets: int = 8

    # --- the edge (app/guard.py, app/serve.py): limits applied before a route runs ---------
    # Host header names the server answers to (comma-separated; "*" any) besides those it always
    # answers: the loopback names (localhost, 127.0.0.1, [::1]), the address `sparsegpt serve
    # --host` binds and the address a connection arrived on (no DNS-rebinding name is one).
    allowed_hosts: str = ""
    # Largest request body of a JSON or form route (uploads have max_upload_bytes), enforced
    # while the body streams in, chunked bodies too.
    max_body_bytes: int = 1024 * 1024
    # Seconds a connection may take to send its request headers, and to stay idle between
    # requests; the most connections one API process holds at once (kept below the open-files
    # limit): beyond it the oldest idle or half-sent ones are closed, 503 when none can be.
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 5.0
    max_connections: int = 1000
    # Addresses of reverse proxies whose X-Forwarded-For/-Proto are believed (comma-separated;
    # "*" any). Empty: proxy headers are ignored.
    forwarded_allow_ips: str = ""

    # --- live progress (app/api/events.py) ---------------------------------------------------
    # Server-Sent-Event streams one API process serves at once (503 + Retry-After beyond it).
    # Each open stream holds one Redis connection while its XREAD blocks (5 s): the process's
    # stream pool has this many + 16 connections.
    max_streams_per_process: int = 200

    # --- job size (app/services/specs.py) -----------------------------------------------------
    # Calibration tokens (nsamples x seqlen) and evaluation windows per dataset a job may ask for.
    max_calibration_tokens: int = 4096 * 2048
    max_eval_windows: int = 4096
    # Memory a worker may give one job's activations and weights (GB); a job whose estimate is
    # larger is refused with the numbers (0: not checked).
    max_job_memory_gb: float = 80.0
    # A worker fails a job whose process's resident memory goes above this (GB), and ends that
    # process at once, before the kernel's OOM killer picks one (0: off).
    worker_max_rss_gb: float = 0.0

    # --- uploads (app/services/uploads.py) ------------------------------------------------------
    # Per user: bytes and number of calibration files kept; files older than the retention are
    # deleted by the sweeper unless a queued or running job uses them (0: no limit / kept).
    upload_quota_bytes_per_user: int = 1024 * 1024 * 1024
    max_uploads_per_user: int = 100
    upload_retention_s: int = 90 * 24 * 3600

    # Accounts. required: every route but /health, /login, static files and the API docs needs a
    # token (Bearer) or a dashboard session; off: single-user mode, everyone is the local admin,
    # allowed only while the server listens on loopback. Unset: off on loopback, else required.
    auth: Literal["required", "off"] | None = None
    # Signs the dashboard's session cookie; unset: generated once and kept in data_dir/secret_key.
    secret_key: str | None = None
    session_max_age_s: int = 14 * 24 * 3600

    # Per-user cap on queued + running jobs (0: no cap); 429 beyond it. A compression plan's jobs
    # count too: its points beyond the cap wait in the plan and are queued as jobs finish.
    max_active_jobs_per_user: int = 8
    # Jobs one compression plan may hold (its points, the dense reference not counted; 0: no cap); 422 beyond it.
    max_jobs_per_plan: int = 24
    # A worker fails a job before it starts when the data directory has less free space.
    min_free_disk_mb: int = 2048
    # Artifacts of finished jobs are deleted this long after the job ended (0: kept forever).
    artifact_retention_s: int = 30 * 24 * 3600
    # The sweeper (a thread of the API process, and `sparsegpt sweeper`; one at a time by a Redis
    # lock): expired heartbeats, lost queue messages, old artifacts.
    sweep_interval_s: float = 15.0
    # A queued job whose run message is in no queue this long after it was sent is sent again.
    lost_message_grace_s: float = 30.0

    # Redis: events kept per job stream, and how long a finished job's stream stays readable.
    events_maxlen: int = 10_000
    events_ttl_s: int = 7 * 24 * 3600
    # A worker is "seen" while its registration key (refreshed every ttl/3) lives.
    worker_seen_ttl_s: int = 30

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'sparsegpt.db'}"

    @property
    def redis(self) -> str:
        if not self.redis_url:
            raise RuntimeError(
                "REDIS_URL is not set (`sparsegpt serve` starts a Redis of its own; "
                "workers and other processes need REDIS_URL=redis://host:6379/0)"
            )
        return self.redis_url

    @property
    def allowed_dirs(self) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in self.local_dirs.split(":") if p.strip()]

    @property
    def eval_task_dirs(self) -> tuple[str, ...]:
        return tuple(str(Path(p).expanduser().resolve()) for p in self.eval_include_dirs.split(":") if p.strip())

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def visibility_timeout_s(self) -> int:
        return self.job_time_limit_s + 3600

    def session_secret(self) -> str:
        """The cookie-signing secret: the setting, else one generated once in the data dir
        (created exclusively, so several processes starting at once agree on it)."""
        if self.secret_key:
            return self.secret_key
        path = self.data_dir / "secret_key"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            for _ in range(50):  # another process is writing it
                value = path.read_text().strip()
                if value:
                    return value
                import time

                time.sleep(0.02)
            raise RuntimeError(f"{path} exists but is empty; delete it or set SPARSEGPT_SECRET_KEY") from None
        value = secrets.token_urlsafe(48)
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
        return value


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 and "localhost"; anything else (0.0.0.0, a LAN address, a name) is not."""
    if not host:
        return False
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache
def get_settings() -> Settings:
    return Settings()
