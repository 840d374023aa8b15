"""The body of POST /api/v1/plans (``PlanIn``) and the plan's JSON (``PlanOut``, for the API's schema).

A plan is one model, one calibration set, one evaluation, and either a ``grid`` of settings (every
combination of sparsities x methods x quantization schemes x refit off/on is a point) or a
``budget`` (the same lists are the candidates, searched in order of size until the budget fails).
Everything the jobs share is given once: ``calibration``, ``evaluation``, ``solver`` (blocksize and
percdamp; refit is the grid's), ``group_size`` / ``actorder`` (for W4A16 and W8A16; FP8_DYNAMIC is
per output channel, so a group size given with FP8_DYNAMIC in the grid is refused by the spec),
``dtype``, ``revision``, ``layers``. Refit on means ``solver.refit = reconstruct``. Lists hold at most
8 entries; wbits, exact and sparsity_profile are not plan settings (their jobs could not be compared
on one chart).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, field_validator, model_validator

from worker.engine.contract.patterns import parse_sparsity
from worker.engine.contract.spec import METHODS
from worker.engine.contract.spec_quant import SCHEMES
from worker.engine.contract.spec_sections import CalibrationSpec, EvaluationSpec, LayersSpec, _Strict

MAX_LIST = 8
NO_QUANTIZATION = ("none", "")  # what a form or the CLI sends for "no quantization"


def normal_sparsity(value: Any) -> str:
    """A sparsity as a plan's point names it: "0" (nothing pruned), "0.5" (from 0.5, "50%"), "2:4"."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("a sparsity is a ratio (0.5), an N:M pattern (2:4) or 0")
    text = str(value).strip()
    if len(text) > 16:
        raise ValueError("a sparsity is a ratio (0.5), an N:M pattern (2:4) or 0")
    try:
        if float(text.rstrip("%").strip() or "x") == 0:
            return "0"
    except ValueError:
        pass
    pattern = parse_sparsity(text if isinstance(value, str) else float(value))  # ValueError with the reason
    return str(pattern)


def _scheme(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and value.strip().lower() in NO_QUANTIZATION) else value


class Candidates(_Strict):
    """The settings a plan tries: every combination of the four lists."""

    sparsities: Annotated[
        list[Annotated[str, BeforeValidator(normal_sparsity)]],
        Field(min_length=1, max_length=MAX_LIST, description='ratios, N:M patterns or 0 ("0", "0.5", "2:4")'),
    ]
    methods: Annotated[
        list[Literal[METHODS]], Field(min_length=1, max_length=MAX_LIST, description="pruning methods")
    ] = ["sparsegpt"]
    quantization: Annotated[
        list[Annotated[Literal[SCHEMES] | None, BeforeValidator(_scheme)]],
        Field(min_length=1, max_length=MAX_LIST, description='schemes; null (or "none"): not quantized'),
    ] = [None]
    refit: Annotated[
        list[bool], Field(min_length=1, max_length=2, description="refit off (false) and/or on (reconstruct)")
    ] = [False]

    @field_validator("sparsities", "methods", "quantization", "refit")
    @classmethod
    def _unique(cls, values: list) -> list:
        return list(dict.fromkeys(values))  # a repeated entry is the same point: dropped


class Budget(Candidates):
    """The smallest setting within the budget: perplexity at most +max_increase_pct % of the dense
    model's, or mean zero-shot accuracy at most max_drop_points points below it."""

    metric: Literal["perplexity", "accuracy"] = "perplexity"
    max_increase_pct: Annotated[float | None, Field(gt=0, le=1000, allow_inf_nan=False)] = None
    max_drop_points: Annotated[float | None, Field(gt=0, le=100, allow_inf_nan=False)] = None

    @model_validator(mode="after")
    def _limit(self) -> Budget:
        if self.metric == "perplexity" and (self.max_increase_pct is None or self.max_drop_points is not None):
            raise ValueError("a perplexity budget sets max_increase_pct (10: at most +10% of the dense model's)")
        if self.metric == "accuracy" and (self.max_drop_points is None or self.max_increase_pct is not None):
            raise ValueError("an accuracy budget sets max_drop_points (2: at most 2 points below the dense model)")
        return self

    def as_json(self) -> dict[str, Any]:
        """The plan's ``budget``: the metric and its limit."""
        if self.metric == "perplexity":
            return {"metric": "perplexity", "max_increase_pct": self.max_increase_pct}
        return {"metric": "accuracy", "max_drop_points": self.max_drop_points}


class PlanSolver(_Strict):
    """The solver options every job shares (refit is the grid's; wbits and exact are not plan settings)."""

    blocksize: Annotated[int, Field(ge=1, le=8192, description="columns solved together (SparseGPT's B)")] = 128
    percdamp: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False, description="Hessian dampening")] = 0.01


class PlanIn(_Strict):
    """What POST /api/v1/plans takes: ``model`` and exactly one of ``grid`` / ``budget``."""

    model: Annotated[str, Field(min_length=1, max_length=512, description="a Hub id or an allowed absolute path")]
    name: Annotated[str | None, Field(max_length=128, description="a name for the plan's page")] = None
    grid: Candidates | None = None
    budget: Budget | None = None
    revision: Annotated[str | None, Field(max_length=255)] = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    solver: PlanSolver = Field(default_factory=PlanSolver)
    layers: LayersSpec = Field(default_factory=LayersSpec)
    group_size: Annotated[
        int | None,
        Field(ge=-1, le=1 << 20, description="W4A16/W8A16 input columns per scale (default 128; -1 per channel)"),
    ] = None
    actorder: bool = False
    priority: Annotated[
        Literal["normal", "low"], Field(description="low: the plan's jobs start after every ordinary job waiting")
    ] = "normal"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = " ".join(value.split())
        if any(not ch.isprintable() for ch in value):
            raise ValueError("the name must be printable text")
        return value or None

    @model_validator(mode="after")
    def _one_mode(self) -> PlanIn:
        if (self.grid is None) == (self.budget is None):
            raise ValueError("give either grid (every setting is tried) or budget (the smallest within it), not both")
        if not self.evaluation.datasets and not self.evaluation.tasks:
            raise ValueError(
                "a plan compares quality: evaluation.datasets (perplexity) or evaluation.tasks (accuracy) must name one"
            )
        if self.budget is not None and self.budget.metric == "perplexity" and not self.evaluation.datasets:
            raise ValueError("a perplexity budget needs evaluation.datasets (the first set is the one compared)")
        if self.budget is not None and self.budget.metric == "accuracy" and not self.evaluation.tasks:
            raise ValueError("an accuracy budget needs evaluation.tasks (their mean accuracy is compared)")
        return self

    @property
    def candidates(self) -> Candidates:
        return self.grid if self.grid is not None else self.budget  # type: ignore[return-value]


# --- the plan's JSON (app/services/plan_view.py builds it; these models are its schema) -------------------


class PlanPointOut(BaseModel):
    key: str
    method: str
    sparsity: str
    quantization: str | None
    refit: bool
    state: Literal["pending", "job", "skipped", "dense"]
    reason: str | None = None
    job_id: int | None = None
    job_url: str | None = None
    status: str
    perplexity: float | None = None
    mean_accuracy: float | None = None
    bytes: int | None = Field(None, description="the job's default artifact's size")
    format: str | None = None
    download_url: str | None = None
    ratio: float | None = Field(None, description="bytes over the dense model's")
    quality_change_pct: float | None = Field(None, description="perplexity over the dense model's, in % (+: worse)")
    accuracy_drop_points: float | None = None
    meets_budget: bool | None = None
    pareto: bool = False
    recommended: bool = False


class PlanDenseOut(BaseModel):
    perplexity: dict[str, float | None] = {}
    accuracy: dict[str, float | None] = {}
    mean_accuracy: float | None = None
    bytes: int | None = None
    job_id: int | None = None


class PlanOut(BaseModel):
    id: int
    url: str
    api_url: str
    name: str | None
    owner: str | None
    model: str
    mode: Literal["grid", "budget"]
    budget: dict[str, Any] | None
    priority: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    dense: PlanDenseOut
    metric: Literal["perplexity", "accuracy"]
    dataset: str | None
    points: list[PlanPointOut]
    recommended: dict[str, Any] | None
    recommendation_reason: str
    counts: dict[str, int]


class PlanSummary(BaseModel):
    id: int
    url: str
    api_url: str
    name: str | None
    model: str
    mode: str
    priority: str
    status: str
    points: int
    created_at: datetime
    finished_at: datetime | None


class PlanList(BaseModel):
    items: list[PlanSummary]
    total: int
    limit: int
    offset: int
