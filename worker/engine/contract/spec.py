"""The job spec: one definition of what a pruning job is, shared by everything that makes one.

``JobSpec`` holds the fields, their defaults, parsing and validation. The API takes it as its
request body, the dashboard's form maps its inputs onto it, the CLI's flags are built from it,
and the worker hands the stored spec to the engine unchanged (only dataset references resolved).

The sections and the ``UI`` marker are ``worker.engine.contract.spec_sections``'s.
Each field that a person sets by hand carries a ``UI`` marker in its annotation: the name of
its input in the new-job form and its CLI flag. ``leaf_fields()`` lists them, so the form and
the CLI need no table of their own: a new field is a change here, in the form template and a
test. What needs the server's state (its caps, allowed directories, uploads that exist) is
checked by the service, not here.

Pure Python + pydantic: importing this module loads no torch (the API imports it).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator

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
from worker.engine.contract.spec_sections import (
    UI,
    CalibrationSpec,
    EvaluationSpec,
    LayersSpec,
    MoeSpec,
    OwlSpec,
    ResourcesSpec,
    SolverSpec,
    _Strict,
)

METHODS = METHOD_NAMES  # (worker.engine.contract.method_table: the one list)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]*$")


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
