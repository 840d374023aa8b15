"""The service's settings: one pydantic-settings ``Settings``, read from the environment and .env.

The names people set are the ones in README: DATABASE_URL, REDIS_URL, SPARSEGPT_DATA_DIR,
SPARSEGPT_LOCAL_DIRS; every other knob is ``SPARSEGPT_<FIELD>``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SPARSEGPT_", env_file=".env", env_file_encoding="utf-8", extra="ignore",
        populate_by_name=True,
    )

    # Where the SQLite file, uploads and artifacts live.
    data_dir: Path = Path("data")
    # None: a SQLite file in data_dir. PostgreSQL: postgresql+psycopg://user:pw@host/db
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "SPARSEGPT_DATABASE_URL")
    )
    # None: `sparsegpt serve` starts a redis-server of its own and sets REDIS_URL for its children.
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "SPARSEGPT_REDIS_URL")
    )
    # ':'-separated directories whose models and text files jobs may name (resolved, symlinks too).
    local_dirs: str = ""
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

    # Request limits.
    max_upload_bytes: int = 64 * 1024 * 1024
    max_nsamples: int = 4096
    max_seqlen: int = 32768
    max_eval_sets: int = 8

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
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def visibility_timeout_s(self) -> int:
        return self.job_time_limit_s + 3600


@lru_cache
def get_settings() -> Settings:
    return Settings()
