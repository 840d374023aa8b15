"""The job spec's sections (calibration, evaluation, solver, layers, owl, moe, resources), the
``UI`` marker of the fields a person sets, and the checks of their values (dataset names, module
name globs, lm-eval task names, storable text). ``worker.engine.contract.spec.JobSpec`` holds them.

Pure Python + pydantic: importing this module loads no torch (the API imports it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

BUILTIN_DATASETS = ("c4", "wikitext2", "ptb")

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
