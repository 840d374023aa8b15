"""Pydantic response models of the API. The request body, ``JobSpec``, is the one job spec of
``worker.engine.contract.spec`` (re-exported here); what needs the server's state (allowed directories,
uploads that exist, the server's caps) is checked by ``app.services.specs``. A job's ``result`` is
the engine's report, ``worker.engine.contract.report.Report`` (torch-free, as the spec).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.engine.contract.report import Report  # the engine's report: a job's result
from worker.engine.contract.spec import DTYPES, METHODS, JobSpec  # noqa: F401 - the API's request model and its vocabulary
from worker.engine.contract.spec_sections import (  # noqa: F401 - the spec's sections and dataset names
    BUILTIN_DATASETS,
    CalibrationSpec,
    EvaluationSpec,
    LayersSpec,
    SolverSpec,
    upload_id,
)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


# --- responses --------------------------------------------------------------------------


class ModuleResultOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    block: int
    name: str
    sparsity: float
    error: float | None
    seconds: float | None


class MetricOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    dataset: str
    dense_perplexity: float | None
    perplexity: float | None


class ArtifactOut(BaseModel):
    url: str
    size: int
    sha256: str
    format: Literal["tar"] = "tar"
    expires_at: datetime | None = Field(None, description="when the retention sweep deletes it (null: kept)")


class ArtifactFileOut(BaseModel):
    """One of a job's artifacts, by format (app/packagers.py); ``hf-tar`` is the default."""

    format: str
    size: int
    sha256: str
    media_type: str
    url: str
    file_name: str = Field(description="the download's file name")
    expires_at: datetime | None = Field(None, description="when the retention sweep deletes it (null: kept)")
    ratio: float | None = Field(
        None,
        description="a quantizing job's formats: the saved directory's bytes over the "
        "whole model's weights in fp16 (the report's quantization sizes)",
    )


class JobSummary(BaseModel):
    id: int
    status: JobStatus
    model: str
    method: str
    sparsity: str
    attempt: int
    owner: str | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    progress: dict[str, Any] | None
    url: str


class JobOut(JobSummary):
    spec: dict[str, Any]
    cancel_requested: bool
    heartbeat_at: datetime | None
    worker: str | None
    queue: str | None = Field(
        None, description="the queue it was sent to: where it fits (resources, its memory estimate)"
    )
    result: Report | None = Field(description="the engine's report (null until the job succeeds)")
    metrics: list[MetricOut]
    modules: list[ModuleResultOut]
    artifact: ArtifactOut | None
    artifacts: list[ArtifactFileOut] = Field([], description="every format the job's model was packaged in")
    artifact_expired_at: datetime | None = Field(None, description="when the artifact's files were removed")
    retry_of: int | None = Field(None, description="the job this one repeats (POST /jobs/{id}/retry)")
    events_url: str

    @field_validator("result", mode="before")
    @classmethod
    def _report(cls, value: Any) -> Report | None:
        return Report.load(value)  # a stored result of any version: a part that no longer validates is left out


class JobList(BaseModel):
    items: list[JobSummary]
    total: int
    limit: int
    offset: int


class CalibrationSetOut(BaseModel):
    id: int
    ref: str = Field(description="what a job's dataset field takes: upload:<id>")
    name: str
    format: Literal["txt", "jsonl"]
    size: int
    sha256: str
    created_at: datetime


class CalibrationSetList(BaseModel):
    items: list[CalibrationSetOut]


class WorkerOut(BaseModel):
    name: str
    queues: list[str]
    gpu: str | None
    pid: int | None
    seen_s_ago: float


class ComponentHealth(BaseModel):
    ok: bool
    error: str | None = None


class HealthStatusOut(BaseModel):
    """The public /health: the overall status only."""

    status: Literal["ok", "degraded", "down"]


class HealthOut(BaseModel):
    status: Literal["ok", "degraded", "down"]
    database: ComponentHealth
    redis: ComponentHealth
    workers: list[WorkerOut]


class UserOut(BaseModel):
    name: str
    is_admin: bool
    local: bool = Field(description="the single-user mode's built-in admin (no sign-in)")


class DiskOut(BaseModel):
    path: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    min_free_bytes: int = Field(description="below this, workers refuse to start jobs")


class UserUsageOut(BaseModel):
    user: str | None
    active_jobs: int = Field(description="queued + running")
    jobs: int
    artifact_bytes: int


class UsageOut(BaseModel):
    disk: DiskOut
    artifacts_bytes: int = Field(description="artifact files on disk under the data directory")
    uploads_bytes: int
    artifact_retention_s: int = Field(description="artifacts are deleted this long after their job ended; 0: kept")
    max_active_jobs_per_user: int = Field(description="0: no cap")
    you: UserUsageOut
    users: list[UserUsageOut]
