"""The job spec: one definition of what a pruning job is, shared by everything that makes one.

``JobSpec`` holds the fields, their defaults, parsing and validation. The API takes it as its
request body, the dashboard's form maps its inputs onto it, the CLI's flags are built from it,
and the worker hands the stored spec to the engine unchanged (only dataset references resolved).

Each field that a person sets by hand carries a ``UI`` marker in its annotation: the name of
its input in the new-job form and its CLI flag. ``leaf_fields()`` lists them, so the form and
the CLI need no table of their own: a new field is a change here, in the form template and a
test. What needs the server's state (its caps, allowed directories, uploads that exist) is
checked by the service, not here.

Pure Python + pydantic: importing this module loads no torch (the API imports it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from worker.engine.contract.method_table import (
    DEFAULT_METHOD,
    METHOD_NAMES,
    check_solver_options,
    describe_methods,
    method_info,
)
from worker.engine.contract.patterns import SparsityPattern, parse_profile, parse_sparsity
from worker.engine.contract.spec_dtypes import DTYPES, stored_dtype, working_dtype  # noqa: F401 (the spec's vocabulary)
from worker.engine.contract.spec_paths import field_paths, get_path, set_path  # noqa: F401 (re-exported)
from worker.engine.contract.spec_quant import check_quantization, empty_as_none, quantization_spec

BUILTIN_DATASETS = ("c4", "wikitext2", "ptb")
METHODS = METHOD_NAMES  # (worker.engine.contract.method_table: the one list)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]*$")
_UPLOAD = re.compile(r"^upload:(\d{1,12})$")
MAX_GLOBS = 32
_TASK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+()\-]{0,127}$")  # an lm-eval task, group or tag name
MAX_TASKS = 32


@dataclass(frozen=True)
class UI:
    """A field's input in the new-job form and its CLI flag; ``suggested``: the value a required field
    starts with there; ``cli_negate``: the flag sets False (``--no-dense-eval``); ``metavar``: a list
    flag's value in --help (default GLOB)."""

    form: str | None = None
    cli: str | None = None
    suggested: str | None = None
    cli_negate: bool = False
    metavar: str | None = None


def check_dataset_name(value: str) -> str:
    """A built-in set (c4, wikitext2, ptb), an uploaded set (upload:<id>) or an absolute path."""
    value = value.strip()
    if value in BUILTIN_DATASETS or _UPLOAD.match(value) or value.startswith("/"):
        if "\x00" in value:
            raise ValueError("a dataset path cannot contain NUL characters")
        return value
    raise ValueError(
        f"dataset {value!r}: use one of {', '.join(BUILTIN_DATASETS)}, upload:<id> "
        "(see POST /api/v1/calibration-sets), or an absolute path under the server's allowed directories"
    )


def split_commas(value: Any) -> Any:
    """``"piqa,arc_easy"`` or ``["piqa,arc_easy", "boolq"]`` as one list of stripped names."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [part.strip() for v in value for part in (v.split(",") if v.strip() else [])]
    return value


def upload_id(dataset: str) -> int | None:
    """The id in ``upload:<id>``, else None."""
    match = _UPLOAD.match(dataset)
    return int(match.group(1)) if match else None


def _check_globs(values: list[str]) -> list[str]:
    if len(values) > MAX_GLOBS:
        raise ValueError(f"at most {MAX_GLOBS} patterns")
    out = []
    for value in values:
        value = value.strip()
        if not value or len(value) > 200 or "\x00" in value:
            raise ValueError(f"{value[:40]!r} is not a module name pattern (1 to 200 characters, e.g. '*.mlp.*')")
        out.append(value)
    return out


def check_text(value: Any) -> Any:
    """Text (or a list of texts) that can be stored and shown: no lone UTF-16 surrogate
    (``"\\udc80"``, what a command line's undecodable bytes become), which no UTF-8 text holds.
    Its message does not repeat the text."""
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(
                    f"must be valid Unicode text: character {err.start + 1} is a lone surrogate "
                    f"(U+{ord(item[err.start]):04X}), which no UTF-8 text can hold"
                ) from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return check_text(value)


class CalibrationSpec(_Strict):
    dataset: Annotated[
        str, Field(description="c4, wikitext2, ptb, upload:<id>, or an allowed file path"), UI(cli="--calibration")
    ] = "c4"
    nsamples: Annotated[
        int, Field(ge=1, description="calibration windows (the server caps it)"), UI(form="nsamples", cli="--nsamples")
    ] = 128
    seqlen: Annotated[
        int | None,
        Field(ge=8, description="tokens per window; null: the model's context, at most 2048"),
        UI(form="seqlen", cli="--seqlen"),
    ] = None
    seed: Annotated[
        int, Field(ge=0, le=2**32 - 1, description="the windows' sampling seed"), UI(form="seed", cli="--seed")
    ] = 0

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str) -> str:
        return check_dataset_name(value)


class EvaluationSpec(_Strict):
    datasets: Annotated[list[str], Field(description="perplexity sets; [] skips evaluation")] = Field(
        default_factory=lambda: ["wikitext2"]
    )
    max_windows: Annotated[
        int | None,
        Field(ge=1, description="cap on evaluation windows per set"),
        UI(form="max_windows", cli="--eval-windows"),
    ] = None
    dense: Annotated[
        bool,
        Field(description="also measure the dense model"),
        UI(form="dense", cli="--no-dense-eval", cli_negate=True),
    ] = True
    tasks: Annotated[
        list[str],
        BeforeValidator(split_commas),
        Field(
            description="lm-evaluation-harness tasks for zero-shot accuracy, dense and pruned (piqa, arc_easy, "
            "hellaswag, "
            "...: any lm-eval task or group; the worker checks that it exists); []: none"
        ),
        UI(form="eval_tasks", cli="--eval-tasks", metavar="TASK[,TASK...]"),
    ] = Field(default_factory=list)
    task_limit: Annotated[
        int | None,
        Field(ge=1, le=10**7, description="at most this many examples per zero-shot task (lm-eval's limit); null: all"),
        UI(form="task_limit", cli="--eval-limit"),
    ] = None
    task_batch_size: Annotated[
        int,
        Field(ge=1, le=1024, description="requests per forward in the zero-shot tasks"),
        UI(form="task_batch_size", cli="--eval-batch-size"),
    ] = 8

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, values: list[str]) -> list[str]:
        checked = [check_dataset_name(v) for v in values]
        if len(set(checked)) != len(checked):
            raise ValueError("evaluation datasets must not repeat")
        return checked

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, values: list[str]) -> list[str]:
        """Only the names' form here (the API loads no lm-eval); the worker checks they exist."""
        if len(values) > MAX_TASKS:
            raise ValueError(f"at most {MAX_TASKS} zero-shot tasks")
        for value in values:
            if not _TASK.match(value):
                raise ValueError(
                    f"{value[:40]!r} is not an lm-eval task name (letters, digits and _ - . + ( ), "
                    "e.g. piqa or arc_easy)"
                )
        if len(set(values)) != len(values):
            raise ValueError("zero-shot tasks must not repeat")
        return values


class SolverSpec(_Strict):
    blocksize: Annotated[
        int,
        Field(ge=1, le=8192, description="columns solved together (SparseGPT's B)"),
        UI(form="blocksize", cli="--blocksize"),
    ] = 128
    percdamp: Annotated[
        float,
        Field(gt=0, le=1, allow_inf_nan=False, description="Hessian dampening, a fraction of its mean diagonal"),
        UI(form="percdamp", cli="--percdamp"),
    ] = 0.01
    wbits: Annotated[
        int | None,
        Field(
            ge=2,
            le=8,
            description="joint quantization bits on the reference's per-row "
            "asymmetric grid (paper section 5; kept for old specs, "
            "not exported compressed: use quantization)",
        ),
        UI(form="wbits", cli="--wbits"),
    ] = None
    exact: Annotated[
        bool,
        Field(
            description="reproduce the reference SparseGPT's arithmetic bit for bit "
            "(one sequence per forward; slower), for checking a result"
        ),
        UI(form="exact", cli="--exact"),
    ] = False
    refit: Annotated[
        Literal["none", "reconstruct", "swap+reconstruct"],
        Field(
            description="after the prune, lower each layer's reconstruction error on the calibration data: "
            "reconstruct (the kept weights re-solved on the fixed mask) or swap+reconstruct (first "
            "mask swaps within the pattern, then reconstruct); none: the method's weights as they are"
        ),
        UI(form="refit", cli="--refit"),
    ] = "none"


class LayersSpec(_Strict):
    """Which decoder blocks and modules are pruned (the rest stay dense)."""

    first_block: Annotated[
        int | None,
        Field(ge=0, le=100_000, description="first block to prune (0-based)"),
        UI(form="first_block", cli="--first-block"),
    ] = None
    last_block: Annotated[
        int | None,
        Field(ge=0, le=100_000, description="last block to prune (inclusive)"),
        UI(form="last_block", cli="--last-block"),
    ] = None
    include: Annotated[
        list[str],
        Field(description="prune only modules whose full name matches one of these globs (e.g. '*.mlp.*'); []: all"),
        UI(form="include", cli="--include"),
    ] = Field(default_factory=list)
    exclude: Annotated[
        list[str],
        Field(description="never prune modules whose full name matches one of these globs"),
        UI(form="exclude", cli="--exclude"),
    ] = Field(default_factory=list)

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, values: list[str]) -> list[str]:
        return _check_globs(values)

    @model_validator(mode="after")
    def _range(self) -> LayersSpec:
        if self.first_block is not None and self.last_block is not None and self.first_block > self.last_block:
            raise ValueError(f"layers.first_block {self.first_block} is after layers.last_block {self.last_block}")
        return self


class OwlSpec(_Strict):
    """OWL (``sparsity_profile: "owl"``, arXiv 2310.05175); ``lambda_`` is ``lambda`` in JSON too."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, loc_by_alias=False)
    m: Annotated[
        float,
        Field(
            gt=0, le=1000, allow_inf_nan=False, description="a Wanda score is an outlier above M times its block's mean"
        ),
        UI(form="owl_m", cli="--owl-m"),
    ] = 5.0
    lambda_: Annotated[
        float,
        Field(
            alias="lambda",
            ge=0,
            lt=0.5,
            allow_inf_nan=False,
            description="the blocks' sparsities spread over 2 x lambda around the target",
        ),
        UI(form="owl_lambda", cli="--owl-lambda"),
    ] = 0.08


class MoeSpec(_Strict):
    """Mixture-of-experts models (worker.engine.moe); a dense model ignores it."""

    all_experts: Annotated[
        bool,
        Field(
            description="send every calibration token through every expert for its "
            "Hessians (the output still follows the router): for experts "
            "the router rarely picks; slower"
        ),
        UI(form="moe_all_experts", cli="--moe-all-experts"),
    ] = False
    min_tokens: Annotated[
        int,
        Field(
            ge=0,
            le=10**9,
            description="an expert routed fewer calibration tokens than "
            "this gets its Hessians from all tokens instead "
            "(recorded per expert)",
        ),
        UI(form="moe_min_tokens", cli="--moe-min-tokens"),
    ] = 128


class ResourcesSpec(_Strict):
    """Where the service runs the job (the engine ignores it): the API routes the job to a worker
    whose GPU has at least this memory, or to a named queue; unset, by its memory estimate."""

    min_gpu_memory_gb: Annotated[
        float | None, Field(ge=0, le=100_000, description="the least GPU memory (GB) of a worker that may run it")
    ] = None
    queue: Annotated[
        str | None,
        Field(
            pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
            description="a Celery queue some live worker consumes (sparsegpt worker --queue)",
        ),
    ] = None


QuantizationSpec = quantization_spec(UI)  # worker.engine.contract.spec_quant


class JobSpec(_Strict):
    """What POST /api/v1/jobs takes. Only ``model`` and ``sparsity`` are required."""

    model: Annotated[
        str,
        Field(
            min_length=1,
            max_length=512,
            description="a Hub id (org/name; never looked up on the server's disk) or an "
            "absolute path under the server's allowed directories",
        ),
        UI(form="model"),
    ]
    revision: Annotated[
        str | None,
        Field(max_length=255, description="Hub branch, tag or commit"),
        UI(form="revision", cli="--revision"),
    ] = None
    trust_remote_code: Annotated[
        bool,
        Field(description="run the model repository's own code"),
        UI(form="trust_remote_code", cli="--trust-remote-code"),
    ] = False
    method: Annotated[
        Literal[METHOD_NAMES], Field(description=describe_methods()), UI(form="method", cli="--method")
    ] = DEFAULT_METHOD
    sparsity: Annotated[
        float | str,
        Field(description='a ratio (0.5) or an N:M pattern ("2:4")'),
        UI(form="sparsity", cli="--sparsity", suggested="0.5"),
    ]
    sparsity_profile: Annotated[
        str | tuple[float, ...],
        BeforeValidator(parse_profile),
        Field(
            description="how the sparsity spreads over the decoder blocks: uniform; owl (blocks with more outliers "
            "pruned less, the mean kept); or one sparsity per block ([0.6, 0.7, ...]; unstructured only)"
        ),
        UI(form="sparsity_profile", cli="--sparsity-profile"),
    ] = "uniform"
    owl: OwlSpec = Field(default_factory=OwlSpec)
    moe: MoeSpec = Field(default_factory=MoeSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    solver: SolverSpec = Field(default_factory=SolverSpec)
    layers: LayersSpec = Field(default_factory=LayersSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    quantization: Annotated[QuantizationSpec | None, BeforeValidator(empty_as_none)] = None
    dtype: Annotated[
        Literal["auto", "float16", "bfloat16", "float32"],
        Field(
            description="load, compute and save dtype; auto: the checkpoint's float16/bfloat16 on a "
            "GPU (else float16), float32 on the CPU"
        ),
        UI(form="dtype", cli="--dtype"),
    ] = "auto"

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
        if _is_zero(value):  # quantization only (GPTQ); refused without quantization (_solver_fits)
            return 0.0
        pattern = parse_sparsity(value)
        return str(pattern) if pattern.structured else pattern.sparsity

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        """Either a path or a Hub id, never both: a path is absolute (``./``, ``../`` and ``~``
        are refused: relative to what?), anything else is a Hub id that the worker never looks
        for on its disk, even when ``org/name`` exists relative to some directory."""
        value = value.strip()
        if "\x00" in value:
            raise ValueError("the model cannot contain NUL characters")
        if value.startswith(("/", "~", ".")):
            if not value.startswith("/"):
                raise ValueError("a local model must be an absolute path under the server's allowed directories")
            return value
        if not _HUB_ID.match(value) or ".." in value:
            raise ValueError(f"{value!r} is not a Hugging Face model id (org/name) nor an absolute local path")
        return value

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        if value is not None and (not _REVISION.match(value) or ".." in value):
            raise ValueError(f"revision {value!r}: a branch, tag or commit hash")
        return value

    @model_validator(mode="after")
    def _solver_fits(self) -> JobSpec:
        check_solver_options(self.method, self.solver, self.pattern, self.quantization)  # what the method allows
        pattern = self.pattern
        if pattern.sparsity == 0:
            if self.quantization is None:
                raise ValueError(
                    "sparsity 0 prunes nothing: set quantization (quantization only) or a sparsity above 0 (0.5 or 2:4)"
                )
            if self.sparsity_profile != "uniform":
                raise ValueError("sparsity_profile needs a sparsity above 0: quantization only prunes nothing")
        check_quantization(self.quantization, method_info(self.method).joint_quantization, self.solver, pattern)
        if pattern.structured and self.sparsity_profile != "uniform":
            kind = "owl" if self.sparsity_profile == "owl" else "per block"
            raise ValueError(
                f"sparsity_profile {kind} needs an unstructured sparsity (0.7), not {pattern}: an N:M "
                "pattern has exactly N zeros in every M weights of every block, so it stays uniform"
            )
        return self

    @property
    def pattern(self) -> SparsityPattern:
        """The sparsity as a pattern; 0 (quantization only) is ``SparsityPattern(0.0)``: no mask."""
        return SparsityPattern(0.0) if self.sparsity == 0 else parse_sparsity(self.sparsity)

    @property
    def quantization_only(self) -> bool:
        return self.quantization is not None and self.pattern.sparsity == 0

    @property
    def reads_calibration(self) -> bool:
        """Whether the job reads calibration data: its method's statistics, or OWL's profile pass."""
        return method_info(self.method).needs_calibration or self.sparsity_profile == "owl"

    @classmethod
    def from_flat(cls, **fields: Any) -> JobSpec:
        """``JobSpec.from_flat(model=..., sparsity="2:4", dataset="c4", nsamples=8, datasets=[])``:
        each field by its own name, for Python callers (field names are unique across sections)."""
        paths = {path[-1]: path for path in field_paths(cls)}
        data: dict[str, Any] = {}
        for name, value in fields.items():
            if name not in paths:
                raise TypeError(f"JobSpec has no field {name!r}")
            set_path(data, paths[name], value)
        return cls.model_validate(data)

    def with_datasets(self, resolve) -> JobSpec:
        """A copy whose calibration and evaluation references are ``resolve(name)`` (the worker
        turns upload:<id> into the stored file's path)."""
        data = self.model_dump()
        data["calibration"]["dataset"] = resolve(self.calibration.dataset)
        data["evaluation"]["datasets"] = [resolve(name) for name in self.evaluation.datasets]
        return JobSpec.model_validate(data)


def _is_zero(value: Any) -> bool:
    """0, 0.0, "0", "0.0", "0%": the sparsity of a quantization-only job."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value == 0
    if isinstance(value, str) and 0 < len(value) <= 16:
        text = value.strip().rstrip("%").strip()
        try:
            return text != "" and all(ch in "0." for ch in text) and float(text) == 0
        except ValueError:
            return False
    return False
