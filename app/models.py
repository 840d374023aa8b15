"""ORM models. The schema itself is made and changed only by the Alembic migrations."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC on the way in and out (SQLite stores naive datetimes)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class User(Base):
    """An API account; only the token's hash is stored."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebSession(Base):
    """A dashboard sign-in. The cookie carries a random session id; only its sha256 is stored,
    and logout (or an admin) revokes the row, which ends the session at once."""

    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the session id
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_id", "status", "id"),
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),
        # One job per (user, Idempotency-Key): a repeated POST finds the first job.
        Index("ux_jobs_owner_idempotency_key", "owner_id", "idempotency_key", unique=True),
        # Ids are never reused (a deleted job's id must not name another user's job later);
        # PostgreSQL's sequences never reuse one anyway.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    # The validated request (schemas.JobSpec as JSON); model/method/pattern repeated for listing.
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    model: Mapped[str] = mapped_column(String(512))
    method: Mapped[str] = mapped_column(String(32))
    sparsity: Mapped[str] = mapped_column(String(16))

    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    # Times a worker claimed the job (a redelivery after a worker died counts again).
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    # The Celery queue its run message goes to (app/services/routing.py); None: the shared one.
    queue: Mapped[str | None] = mapped_column(String(160))
    # The claiming worker: Celery node name and the pid of the process running the task.
    worker: Mapped[str | None] = mapped_column(String(255))
    worker_pid: Mapped[int | None] = mapped_column(Integer)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()

    error: Mapped[str | None] = mapped_column(Text)
    # The last progress event (the live one is in Redis), and the report's summary.
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The sha256 of each per-block checkpoint file mirrored to the shared store ({name: sha256}, state.json
    # included): a fetched checkpoint is taken up only when it matches (app/mirror.py; migration 0006).
    checkpoint_files: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    artifact_path: Mapped[str | None] = mapped_column(String(1024))
    artifact_size: Mapped[int | None] = mapped_column(BigInteger)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    # Set when the retention sweep (or a person) removed the artifact's files.
    artifact_expired_at: Mapped[datetime | None] = mapped_column()

    # The Idempotency-Key of the POST that made it, and the sha256 of that request's spec.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    spec_sha256: Mapped[str | None] = mapped_column(String(64))
    # When its run message was last sent (the sweeper re-sends one the broker lost).
    enqueued_at: Mapped[datetime | None] = mapped_column()
    # POST /jobs/{id}/retry: the job this one repeats.
    retry_of: Mapped[int | None] = mapped_column(Integer)
    # The compression plan it belongs to (a retry keeps it), and the Celery message priority every
    # (re)send of its run message uses (None: the default; a "low" plan's jobs go after the others).
    plan_id: Mapped[int | None] = mapped_column(ForeignKey("plans.id", ondelete="SET NULL"), index=True)
    priority: Mapped[int | None] = mapped_column(Integer)

    owner: Mapped[User | None] = relationship(lazy="joined")
    modules: Mapped[list[ModuleResult]] = relationship(
        back_populates="job",
        cascade="all, delete-orphan",
        order_by="(ModuleResult.block, ModuleResult.id)",
        passive_deletes=True,
    )
    metrics: Mapped[list[Metric]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Metric.id", passive_deletes=True
    )
    # Its artifacts, one per format (app/packagers.py); the artifact_* columns above repeat the default's.
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Artifact.id", passive_deletes=True
    )


class Plan(Base):
    """A compression plan: one model, calibration and evaluation, and candidate settings (``points``,
    each with its state and job) run as ordinary jobs, over a grid or a budget search
    (app/services/plans.py). ``base`` is the shared part of every job's spec."""

    __tablename__ = "plans"
    __table_args__ = (
        Index("ux_plans_owner_idempotency_key", "owner_id", "idempotency_key", unique=True),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    name: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(512))
    base: Mapped[dict[str, Any]] = mapped_column(JSON)
    mode: Mapped[str] = mapped_column(String(8))  # grid | budget
    budget: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    points: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    priority: Mapped[str] = mapped_column(String(8), default="normal")  # normal | low
    status: Mapped[str] = mapped_column(String(16), default=QUEUED, index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    body_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()

    owner: Mapped[User | None] = relationship(lazy="joined")


class ModuleResult(Base):
    """One pruned Linear: achieved sparsity, relative reconstruction error, solve time."""

    __tablename__ = "module_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    block: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(255))
    sparsity: Mapped[float] = mapped_column(Float)
    error: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float | None] = mapped_column(Float)

    job: Mapped[Job] = relationship(back_populates="modules")


class Metric(Base):
    """Perplexity on one evaluation set, dense and pruned."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("job_id", "dataset"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    dataset: Mapped[str] = mapped_column(String(255))
    dense_perplexity: Mapped[float | None] = mapped_column(Float)
    perplexity: Mapped[float | None] = mapped_column(Float)

    job: Mapped[Job] = relationship(back_populates="metrics")


class Artifact(Base):
    """One downloadable file of a job's pruned model in one format: where the store keeps it (a
    path in the data directory or an object URL, app/storage.py), its size and sha256."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "format"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    format: Mapped[str] = mapped_column(String(32))
    media_type: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set when the retention sweep (or a person) removed its files (with the job's artifact_expired_at).
    expired_at: Mapped[datetime | None] = mapped_column()

    job: Mapped[Job] = relationship(back_populates="artifacts")


class CalibrationSet(Base):
    """An uploaded .txt/.jsonl file; jobs name it as ``upload:<id>``. The path is ours."""

    __tablename__ = "calibration_sets"
    __table_args__ = {"sqlite_autoincrement": True}  # upload:<id> never names a later file

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(8))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
