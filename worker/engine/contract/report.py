"""THE report of a pruning job, typed: what the engine measured, in one pydantic model with nested parts.

The engine builds it (``worker.engine.pipeline``) and saves it as ``sparsegpt_report.json``; the
worker stores it whole as the job's ``result``; the API gives its schema to ``result`` in OpenAPI;
the job page, the model card (``worker.engine.card``) and the CLI summary read its attributes.
A field added here reaches all of them; one marked ``show=("card", "page")`` is also listed among
the facts of the card and the job page (``facts``) with no edit to either.

Loading stays lenient, because reports outlive code: every field is optional (a job row's stored
result from before this module held only some of them), unknown keys are kept (``extra="allow"``),
and a part is dumped with exactly the keys it was given or set, so an old report round-trips to the
same JSON. No torch here: the API imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

Number = float | None  # a measured float; None where it was not finite (stored results hold no NaN)


def shown(default: Any, description: str, *places: str) -> Any:
    """A field listed among the facts of ``places`` ("card": the model card, "page": the job page)."""
    return Field(default, description=description, json_schema_extra={"show": list(places)})


class Part(BaseModel):
    """A part of the report: optional fields, unknown keys kept, dumped with the keys it holds."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_serializer(mode="wrap")
    def _held_keys(self, handler):
        data = handler(self)
        declared = {f.alias or name: name for name, f in type(self).model_fields.items()}
        return {k: v for k, v in data.items() if k not in declared or declared[k] in self.model_fields_set}

    def to_dict(self) -> dict[str, Any]:
        """As the report's JSON file holds it (floats as they are: NaN stays NaN)."""
        return self.model_dump(by_alias=True)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe (a non-finite float becomes None): the job row's ``result``, the API's."""
        return self.model_dump(mode="json", by_alias=True)


class DenseWeight(Part):
    name: str | None = None
    shape: list[int] = []
    reason: str | None = None


class Coverage(Part):
    """What the sparsity counts, and every weight of the pruned blocks left dense, with why."""

    counted: str | None = Field(None, description="what counts as a weight")
    weights: int | None = None
    weights_pruned: int | None = None
    weights_dense: int | None = None
    dense: list[DenseWeight] = []
    model_parameters: int | None = Field(None, description="every parameter of the model (embeddings, head, norms)")


class ExpertsModule(Part):
    """One fused experts module: its experts pruned one by one, tokens and Hessian source per expert."""

    block: int | None = None
    module: str | None = None
    experts: int | None = None
    tokens: list[int] | None = None
    hessian: list[str] | None = None  # all_tokens | routed | all_tokens_fallback, per expert; None: no data


class Profile(Part):
    """The per-block sparsity asked (uniform, a user's list, OWL's) and achieved (None: block not pruned)."""

    profile: str | None = None  # uniform | list | owl
    m: float | None = None
    lambda_: float | None = Field(None, alias="lambda")
    outlier_ratio: list[Number] | None = None
    mean: str | None = None
    targets: list[Number] = []
    achieved: list[Number] = []


class Calibration(Part):
    dataset: str | None = Field(None, description="the name the user gave (wikitext2, upload:3, a path)")
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int | None = None


class DataFile(Part):
    """A data file the run read (calibration or evaluation): its digest, so that the card can name it."""

    sha256: str | None = None
    suffix: str | None = None  # .txt | .jsonl: how it is read


class FormatSize(Part):
    bytes: int | None = None  # the saved directory's files (weights, config, tokenizer, card, report)
    ratio: float | None = None  # bytes / the whole model's weights in fp16


class QuantizationSizes(Part):
    dense_fp16_bytes: int | None = None  # every weight of the model in fp16 (2 bytes each)
    decoder_weights_bytes: int | None = None  # the quantized layers as stored: codes (bits) + scales
    decoder_weights_fp16_bytes: int | None = None  # the same weights in fp16
    decoder_weights_ratio: float | None = None
    formats: dict[str, FormatSize] = {}  # each saved format (compressed-tensors, dense) by name


class QuantizationPart(Part):
    """The weights' quantization (issue 26): what grid, how it was applied, what stayed float, the sizes."""

    scheme: str | None = None  # W4A16 | W8A16 | FP8_DYNAMIC
    group_size: int | None = None  # -1: one scale per output channel
    actorder: bool | None = None
    bits: int | None = None
    observer: str | None = None  # how each group's scale was chosen: mse (searched) | minmax
    how: str | None = None  # in-solve (the joint solve; GPTQ at sparsity 0) | round-to-nearest (after the prune)
    blocks_one_pass: int | None = None  # blocks solved in one pass (Hessians from the solved layers before)
    blocks_two_passes: int | None = None  # blocks solved from the dense block's Hessians
    two_passes: list[dict] = []  # {block, reason}: why a block asked to run once ran twice
    quantization_only: bool | None = None  # sparsity 0: no weight pruned
    layers_quantized: int | None = None  # Linears and expert matrices
    experts_quantized: int | None = None  # of which expert matrices (one per expert and fused parameter)
    unquantized: list[dict] = []  # {name, reason}: Linears of the model left in float
    sizes: QuantizationSizes | None = None


class Solver(Part):
    blocksize: int | None = None
    percdamp: float | None = None
    percdamp_max_used: float | None = Field(None, description="the most dampening a layer needed; 0: none pruned")
    wbits: int | None = None
    exact: bool | None = None
    refit: str | None = None


class Refit(Part):
    """The refit after the prune: size-weighted mean errors before and after, swaps, seconds."""

    mode: str | None = None
    layers: int | None = None
    not_refit: list[str] = []
    error_before: Number = None
    error_after: Number = None
    swaps: int | None = None
    seconds: float | None = None


class LayersSelected(Part):
    first_block: int | None = None
    last_block: int | None = None
    include: list[str] = []
    exclude: list[str] = []


class Evaluation(Part):
    datasets: list[str] = []
    max_windows: int | None = None
    windows: dict[str, int] = {}


class LayerRefit(Part):
    mode: str | None = None
    error_before: Number = None
    swaps: int | None = None
    seconds: float | None = None
    experts: int | None = None  # a fused experts parameter: how many experts its figures cover


class Layer(Part):
    """One pruned module (or fused experts parameter)."""

    block: int | None = None
    name: str | None = None
    sparsity: Number = None
    target: Number = None
    error: Number = None  # relative reconstruction error on the calibration data
    seconds: float | None = None
    loss: Number = None
    percdamp: float | None = None
    refit: LayerRefit | None = None
    # 1: solved in its block's one pass, its Hessian from the block's layers before it as solved;
    # 2: its Hessian from the dense block (the reference's order); None: no calibration data read
    passes: int | None = None


class Timings(Part):
    """Seconds per step (only the steps that ran; ``eval`` is dense + pruned, ``refit`` is within ``prune``)."""

    load: float | None = None
    data: float | None = None
    profile: float | None = None
    eval_dense: float | None = None
    zero_shot_dense: float | None = None
    prune: float | None = None
    eval_pruned: float | None = None
    zero_shot_pruned: float | None = None
    eval: float | None = None
    refit: float | None = None
    save: float | None = None
    total: float | None = None


class Environment(Part):
    python: str | None = None
    torch: str | None = None
    transformers: str | None = None
    device: str | None = None
    cpu_threads: int | None = None
    gpu: str | None = None
    cuda: str | None = None


class ZeroShot(Part):
    """lm-evaluation-harness's zero-shot metrics: task -> metric -> value, dense and pruned."""

    tasks: list[str] = []
    limit: int | None = None
    batch_size: int | str | None = None
    lm_eval: str | None = None
    placement: str | None = None
    examples: dict[str, int] = {}
    dense: dict[str, dict[str, Number]] = {}
    pruned: dict[str, dict[str, Number]] = {}


class RunFacts(Part):
    """How the run was carried out (the engine's RunOptions, without the token and the resume directory)."""

    device: str | None = None
    output: str | None = None
    batch_size: int | None = None
    task_dirs: list[str] = []


class Report(Part):
    """A job's report. Paths appear only as the names the user gave (``RunOptions.labels``)."""

    model: str | None = Field(None, description="the model as the user named it")
    revision: str | None = shown(None, "revision", "card", "page")
    method: str | None = None
    pattern: str | None = None
    sparsity: Number = Field(None, description="zeros over every weight of the pruned blocks")
    sparsity_pruned_modules: Number = Field(None, description="zeros over the pruned modules' weights")
    coverage: Coverage | None = None
    experts: list[ExpertsModule] = []
    profile: Profile | None = None
    calibration: Calibration | None = None
    files: dict[str, DataFile] = Field({}, description="each data file read, by the user's name for it (upload:3)")
    solver: Solver | None = None
    quantization: QuantizationPart | None = None
    refit: Refit | None = None
    layers_selected: LayersSelected | None = None
    evaluation: Evaluation | None = None
    dense_perplexity: dict[str, Number] = Field({}, description="per evaluation set (the user's name for it)")
    perplexity: dict[str, Number] = Field({}, description="the pruned model's, per evaluation set")
    seconds: Timings = Field(default_factory=Timings)
    peak_memory_bytes: int | None = shown(None, "peak memory while pruning (bytes)", "card")
    peak_rss_bytes: int | None = None
    dtype: str | None = shown(None, "saved weights' dtype", "card", "page")
    layers: list[Layer] = []
    environment: Environment | None = None
    spec: dict[str, Any] | None = Field(None, description="the job spec as the user gave it")
    run: RunFacts | None = None
    output: str | None = None
    zero_shot: ZeroShot | None = None

    @classmethod
    def load(cls, data: Any) -> Report | None:
        """A stored report or result (a dict) as a Report, or None when it is not one. A part that
        does not validate (written by some other version) is left out rather than failing the page."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            return None
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            bad = {e["loc"][0] for e in err.errors() if e["loc"]}
            return cls.model_validate({k: v for k, v in data.items() if k not in bad})


def as_report(value: Report | Mapping[str, Any]) -> Report:
    """``value`` if it is a report, else the report a dict (e.g. a report JSON file's) holds."""
    report = Report.load(value)
    if report is None:
        raise TypeError(f"not a report: {type(value).__name__}")
    return report


def facts(report: Report, place: str) -> list[tuple[str, str]]:
    """(label, text) of every field of ``report``'s class marked to show at ``place`` that has a value."""
    out = []
    for name, info in type(report).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        value = getattr(report, name)
        if place in (extra.get("show") or []) and value not in (None, "", [], {}):
            out.append((info.description or name, _text(value)))
    return out


def _text(value: Any) -> str:
    if isinstance(value, Part):
        value = value.to_json()
    if isinstance(value, dict):
        return ", ".join(f"{k} {_text(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:,}"
    return str(value)
