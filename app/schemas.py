"""Pydantic request and response models. ``JobSpec`` is the job spec of DESIGN.md.

Everything here is checked without the server's state; what needs it (allowed directories,
uploads that exist, the server's caps) is checked by ``app.validation``.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BUILTIN_DATASETS = ("c4", "wikitext2", "ptb")
METHODS = ("sparsegpt", "wanda", "magnitude")
DTYPES = ("auto", "float16", "bfloat16", "float32")
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]*$")
_UPLOAD = re.compile(r"^upload:(\d{1,12})$")


def parse_sparsity(value: Any) -> float | str:
    """0.5 / "0.5" / "50%" -> 0.5 (unstructured); "2:4" -> "2:4" (N zeros in every M)."""
    if isinstance(value, str):
        match = _NM.match(value)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if not 0 < n < m:
                raise ValueError(f"pattern {value!r}: N:M needs 0 < N < M (for example 2:4 or 4:8)")
            if m > 128:
                raise ValueError(f"pattern {value!r}: M must be at most 128")
            return f"{n}:{m}"
        text = value.strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(f"{value!r} is neither a ratio (0.5) nor an N:M pattern (2:4, 4:8)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is neither a ratio (0.5) nor an N:M pattern (2:4, 4:8)")
    ratio = float(value)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio {ratio:g} is out of range: it must be strictly between 0 and 1")
    return ratio


def check_dataset_name(value: str) -> str:
    value = value.strip()
    if value in BUILTIN_DATASETS or _UPLOAD.match(value) or value.startswith("/"):
        if "\x00" in value:
            raise ValueError("a dataset path cannot contain NUL characters")
        return value
    raise ValueError(
        f"dataset {value!r}: use one of {', '.join(BUILTIN_DATASETS)}, upload:<id> "
        "(see POST /api/v1/calibration-sets), or an absolute path under the server's allowed directories"
    )


def upload_id(dataset: str) -> int | None:
    match = _UPLOAD.match(dataset)
    return int(match.group(1)) if match else None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationSpec(_Strict):
    dataset: str = Field("c4", description="c4, wikitext2, ptb, upload:<id>, or an allowed file path")
    nsamples: int = Field(128, ge=1, description="calibration windows (the server caps it)")
    seqlen: int | None = Field(
        None, ge=8, description="tokens per window; null: the model's context, at most 2048"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str) -> str:
        return check_dataset_name(value)


class EvaluationSpec(_Strict):
    datasets: list[str] = Field(
        default_factory=lambda: ["wikitext2"], description="perplexity sets; [] skips evaluation"
    )
    max_windows: int | None = Field(None, ge=1, description="cap on evaluation windows per set")
    dense: bool = Field(True, description="also measure the dense model")

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, values: list[str]) -> list[str]:
        checked = [check_dataset_name(v) for v in values]
        if len(set(checked)) != len(checked):
            raise ValueError("evaluation datasets must not repeat")
        return checked


class SolverSpec(_Strict):
    blocksize: int = Field(128, ge=1, le=8192, description="columns solved together (SparseGPT's B)")
    percdamp: float = Field(0.01, gt=0, le=1, description="Hessian dampening, a fraction of its mean diagonal")
    wbits: int | None = Field(None, ge=2, le=8, description="joint quantization bits (paper section 5)")
    exact: bool = Field(False, description="reproduce the reference SparseGPT's arithmetic bit for bit "
                                           "(one sequence per forward; slower), for checking a result")


class JobSpec(_Strict):
    """What POST /api/v1/jobs takes. Only ``model`` and ``sparsity`` are required."""

    model: str = Field(..., min_length=1, max_length=512, description="hub id (org/name) or allowed local path")
    revision: str | None = Field(None, max_length=255)
    trust_remote_code: bool = False
    method: Literal["sparsegpt", "wanda", "magnitude"] = "sparsegpt"
    sparsity: float | str = Field(..., description='a ratio (0.5) or an N:M pattern ("2:4")')
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    solver: SolverSpec = Field(default_factory=SolverSpec)
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="load, compute and save dtype"
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "facebook/opt-125m",
                    "method": "sparsegpt",
                    "sparsity": "2:4",
                    "calibration": {"dataset": "c4", "nsamples": 128, "seqlen": 2048, "seed": 0},
                    "evaluation": {"datasets": ["wikitext2"], "max_windows": None},
                    "solver": {"blocksize": 128, "percdamp": 0.01, "wbits": None},
                }
            ]
        },
    )

    @field_validator("sparsity", mode="before")
    @classmethod
    def _sparsity(cls, value: Any) -> float | str:
        return parse_sparsity(value)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        value = value.strip()
        if "\x00" in value:
            raise ValueError("the model cannot contain NUL characters")
        if value.startswith(("/", "~", ".")):
            if not value.startswith("/"):
                raise ValueError("a local model must be an absolute path under the server's allowed directories")
            return value
        if not _HUB_ID.match(value) or ".." in value:
            raise ValueError(
                f"{value!r} is not a Hugging Face model id (org/name) nor an absolute local path"
            )
        return value

    @model_validator(mode="after")
    def _solver_fits(self) -> JobSpec:
        if self.solver.wbits is not None and self.method != "sparsegpt":
            raise ValueError("solver.wbits (joint quantization) works with method sparsegpt only")
        if self.solver.exact and self.method != "sparsegpt":
            raise ValueError("solver.exact reproduces the reference SparseGPT: it works with method sparsegpt only")
        if isinstance(self.sparsity, str) and self.method == "sparsegpt":
            m = int(self.sparsity.split(":")[1])
            if self.solver.blocksize % m:
                raise ValueError(f"solver.blocksize {self.solver.blocksize} must be a multiple of M={m} for {self.sparsity}")
        return self

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        if value is not None and (not _REVISION.match(value) or ".." in value):
            raise ValueError(f"revision {value!r}: a branch, tag or commit hash")
        return value


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
    result: dict[str, Any] | None
    metrics: list[MetricOut]
    modules: list[ModuleResultOut]
    artifact: ArtifactOut | None
    artifact_expired_at: datetime | None = Field(None, description="when the artifact's files were removed")
    retry_of: int | None = Field(None, description="the job this one repeats (POST /jobs/{id}/retry)")
    events_url: str


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
