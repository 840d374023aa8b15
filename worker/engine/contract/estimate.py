"""How much memory a pruning job needs, from the model's ``config.json`` and the spec, counted
the way the engine runs it (``worker/engine/pipeline.py`` and ``sequential.py``). No torch here:
the API checks it before a job is queued, the worker again once it knows its device, its dtype
and the model's config (``worker/memory.py``).

Where the engine keeps what, for the whole job (host memory and the accelerator together):

- the model's weights, in the working dtype (``dtype: auto``: the checkpoint's fp16/bf16 on
  CUDA, else fp16; fp32 on the CPU), from the load to the save. When they are loaded in the dtype
  the checkpoint stores them in (``JobSize.mapped``), transformers memory-maps them and the engine
  never writes them: the decoder blocks are file pages the kernel can drop and read again, and
  each pruned block is re-pointed at the job's per-block checkpoint file
  (``worker/engine/offload.py``), so only the weights outside the blocks (embeddings, head) count.
  Otherwise (another dtype, a GGUF file) transformers converts ALL of them into host memory;
- the calibration activations: the hidden states entering the block in flight,
  nsamples x seqlen x hidden in the working dtype, ONE buffer (a block's outputs replace its
  inputs chunk by chunk); on the GPU when they fit in 40 % of its free memory, else in pinned
  host memory. Evaluation holds windows x seqlen x hidden the same way, one set at a time,
  after the calibration buffer is gone: the larger of the two counts;
- the block in flight on the compute device: a copy of its weights (on the GPU; on the CPU the
  copy it is pruned on, which keeps the mapped files unwritten), the fp32
  Hessians of its Linears' inputs (columns^2 x 4 bytes per group: q/k/v share one, gate/up
  share one; each expert of a mixture-of-experts block its own), all held until the block is
  solved, the solve's fp32 working copies of its largest group (its weights and errors, and four
  columns x columns matrices: the Hessian, its Cholesky factor, the identity it is solved
  against and the inverse's factor), and one chunk's forward temporaries (16k tokens a chunk on
  CUDA, 2k on the CPU).

Not counted: attention score matrices (the default SDPA attention does not materialise them),
the tokenizer, the Python process itself (a few hundred MB). Measured on the CPU (fp32, a random
LLaMA of hidden 512, 2048 x 256 calibration tokens), the peak above the loaded process was
10-30 % over this estimate (the allocator's fragmentation during a block's pass): the limit
should leave that margin.

A config whose sizes are no sizes (an integer of 2**31 or more, e.g. ``"hidden_size": 10**400``)
is refused, local or Hub alike: ``estimate`` gives an ``Estimate`` whose ``refusal`` names the
field (the API answers 422 on ``model``); no worker could load such a model either. A size of 0,
a negative one or one of another type counts as not given, as before (some configs write -1 or
null for "unset"); a too-large context length is ignored (it only caps the default seqlen). Any
other arithmetic failure gives None (left to the worker), never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.engine.contract.spec import METHODS, method_info  # (worker.engine.contract.method_table, through the spec)

GB = 1e9
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
DEFAULT_SEQLEN = 2048  # the engine's when the spec has none (capped by the model's context)
TOKENS_PER_CHUNK = {"cuda": 16_384, "cpu": 2_048}  # as worker/engine/pipeline.py
LOGIT_TOKENS = 256  # evaluation's fp32 logits are made this many tokens at a time
# Evaluation windows of the built-in sets (tokens of their test split with a LLaMA-sized
# vocabulary, rounded up); c4's evaluation is cut at 256 windows, as the reference does.
BUILTIN_EVAL_TOKENS = {"wikitext2": 345_000, "ptb": 120_000, "c4": 600_000}
BUILTIN_EVAL_WINDOWS = {"c4": 256}
BYTES_PER_TOKEN = 4  # an uploaded or local text file: about 4 bytes of English per token
MAX_SIZE = 2**31 - 1  # any size or count in a config above this is no size
NON_GATED = {"opt", "gpt2", "bloom", "gpt_neox", "phi", "falcon", "gptj", "gpt_bigcode", "mpt", "codegen", "starcoder2"}
SETTING = "SPARSEGPT_MAX_JOB_MEMORY_GB"


class UnusableConfig(ValueError):
    """A size in config.json that is no size (an integer above ``MAX_SIZE``)."""

    def __init__(self, name: str, value: int):
        shown = f"{value:,}" if value < 10**15 else f"about 10^{int(value.bit_length() * 0.30103)}"
        super().__init__(
            f"the model's config.json gives {name} = {shown}, which is not a size (at most "
            f"{MAX_SIZE:,}): its memory cannot be estimated and no worker could load it"
        )


class UnreadableConfig(dict):
    """An empty config standing for a ``config.json`` that is JSON but cannot be read as a
    config (nested deeper than the parser recurses): ``estimate`` refuses it with ``problem``
    (422 on ``model``) instead of the RecursionError that was a 500."""

    def __init__(self, problem: str):
        super().__init__()
        self.problem = problem


def _first(config: dict[str, Any], *names: str, strict: bool = True) -> int | None:
    """The first of ``names`` that is a positive integer; one above ``MAX_SIZE`` raises
    ``UnusableConfig`` (``strict``) or counts as not given."""
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if value <= MAX_SIZE:
                return value
            if strict:
                raise UnusableConfig(name, value)
    return None


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimate needs, read from a transformers config (as a dict)."""

    model_type: str
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    attn_out: int  # columns of the attention's output projection (heads x head_dim)
    kv: int  # rows of each of k and v (kv heads x head_dim)
    gated: bool  # gate/up/down MLP (LLaMA family) rather than fc1/fc2
    experts: int
    expert_intermediate: int  # an expert's MLP width (moe_intermediate_size, else intermediate)
    shared_intermediate: int  # the shared experts' MLP width, 0 for none (Qwen2-MoE, DeepSeek)
    tied: bool
    context: int | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape | None:
        """None when the config does not say the model's sizes (the worker checks after loading);
        ``UnusableConfig`` when one of them is an integer above ``MAX_SIZE``."""
        if not isinstance(config, dict):
            return None
        if _first(config, "hidden_size", "n_embd", "d_model") is None and isinstance(config.get("text_config"), dict):
            config = {
                **config["text_config"],
                "model_type": config["text_config"].get("model_type", config.get("model_type")),
            }
        hidden = _first(config, "hidden_size", "n_embd", "d_model", "dim")
        layers = _first(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
        vocab = _first(config, "vocab_size", "padded_vocab_size")
        if hidden is None or layers is None or vocab is None:
            return None
        heads = _first(config, "num_attention_heads", "n_head", "num_heads", "n_heads") or 1
        head_dim = _first(config, "head_dim") or max(1, hidden // heads)
        kv_heads = (
            1 if config.get("multi_query") is True else _first(config, "num_key_value_heads", "num_kv_heads") or heads
        )
        model_type = str(config.get("model_type") or "")
        intermediate = _first(config, "intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size") or 4 * hidden
        experts = _first(config, "num_local_experts", "num_experts", "n_routed_experts") or 1
        expert_intermediate = (_first(config, "moe_intermediate_size") if experts > 1 else None) or intermediate
        shared = _first(config, "shared_expert_intermediate_size") or 0
        if not shared and experts > 1 and "intermediate_size_mlp" in config:  # Llama 4: one shared expert
            shared = intermediate  # of the experts' width (intermediate_size_mlp is its dense layers')
        if not shared and experts > 1:
            shared = (_first(config, "n_shared_experts", "num_shared_experts") or 0) * expert_intermediate
        return cls(
            model_type=model_type,
            hidden=hidden,
            layers=layers,
            vocab=vocab,
            intermediate=intermediate,
            attn_out=heads * head_dim,
            kv=kv_heads * head_dim,
            gated=model_type not in NON_GATED,
            experts=experts,
            expert_intermediate=expert_intermediate,
            shared_intermediate=shared,
            tied=bool(config.get("tie_word_embeddings", True)),
            context=_first(config, "max_position_embeddings", "n_positions", "seq_length", "max_seq_len", strict=False),
        )

    @property
    def block_params(self) -> int:
        h = self.hidden
        attention = h * self.attn_out + 2 * h * self.kv + self.attn_out * h
        mlp = (3 if self.gated else 2) * h
        if self.experts == 1:
            return attention + mlp * self.intermediate
        return attention + mlp * (self.expert_intermediate * self.experts + self.shared_intermediate)

    @property
    def outside_blocks_params(self) -> int:
        """The embeddings and the head (a tied head counted once)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.outside_blocks_params

    @property
    def hessian_bytes(self) -> int:
        """One block's fp32 Hessians: q/k/v's input, o's, the MLP's input and down's (per expert,
        and the shared experts')."""
        h = self.hidden
        attention = h * h + self.attn_out**2
        if self.experts == 1:
            return 4 * (attention + h * h + self.intermediate**2)
        shared = h * h + self.shared_intermediate**2 if self.shared_intermediate else 0
        return 4 * (attention + self.experts * (h * h + self.expert_intermediate**2) + shared)

    @property
    def solve_bytes(self) -> int:
        """The largest group's solve: its weights stacked in fp32 plus their errors, and four fp32
        columns x columns matrices (the Hessian, its Cholesky factor, the identity and the
        inverse's factor: worker/engine/sparsegpt.py)."""
        h = self.hidden
        i = self.intermediate if self.experts == 1 else max(self.expert_intermediate, self.shared_intermediate)
        groups = [((self.attn_out + 2 * self.kv) * h, h), ((2 if self.gated else 1) * i * h, h), (h * i, i)]
        return max(2 * 4 * weights + 4 * 4 * cols * cols for weights, cols in groups)


@dataclass(frozen=True)
class JobSize:
    """What of the job the estimate depends on. ``method`` is the spec's, except that magnitude
    pruning with an OWL profile is "magnitude+owl": OWL's statistics pass reads the calibration
    activations that plain magnitude pruning never holds."""

    method: str
    nsamples: int
    seqlen: int | None  # None: the model's context, at most 2048 (the engine's default)
    dtype: str  # float16 | bfloat16 | float32 (the working dtype)
    device: str  # cuda | cpu (the compute device)
    eval_sets: tuple[tuple[str, int | None], ...] = ()  # (name, text bytes; None: a built-in set)
    max_windows: int | None = None
    mapped: bool = False  # the weights are loaded in the dtype the checkpoint stores (memory-mapped)
    stored: str | None = None  # that dtype, where the config says it


def estimate_method(method: str, sparsity_profile: str) -> str:
    """``JobSize.method`` of a spec: its method, "+owl" where OWL reads data its method does not (magnitude)."""
    return method + ("+owl" if not reads_calibration(method) and sparsity_profile == "owl" else "")


def reads_calibration(method: str) -> bool:
    """Whether a ``JobSize.method`` holds calibration activations and fp32 Hessians (full ones for any
    method that reads statistics; "+owl": OWL's pass reads them)."""
    name, _, owl = method.partition("+")
    return owl == "owl" or name not in METHODS or method_info(name).needs_calibration


def _gb(nbytes: float) -> str:
    value = nbytes / GB
    return f"{value:,.0f} GB" if value >= 10 else f"{value:.2g} GB" if value >= 0.01 else f"{value:.1g} GB"


@dataclass(frozen=True)
class Estimate:
    total: int
    weights: int
    activations: int
    block: int
    parts: tuple[str, ...]  # each part in words, with its numbers
    advice: str
    field: tuple[str, ...]  # the spec field to lower (where a form shows the message)
    problem: str = ""  # the config is unusable (``UnusableConfig``): refused whatever the limit

    def refusal(self, limit_gb: float) -> str | None:
        """The message when the job does not fit ``limit_gb`` (0 or less: no limit)."""
        if self.problem:
            return self.problem
        if limit_gb <= 0 or self.total <= limit_gb * GB:
            return None
        return (
            f"this job needs about {_gb(self.total)} ({'; '.join(self.parts)}) but a worker gives a job "
            f"at most {limit_gb:g} GB ({SETTING}); {self.advice}"
        )


def _eval_windows(name: str, text_bytes: int | None, seqlen: int, max_windows: int | None) -> int:
    tokens = BUILTIN_EVAL_TOKENS.get(name, 0) if text_bytes is None else text_bytes // BYTES_PER_TOKEN
    windows = tokens // seqlen
    if name in BUILTIN_EVAL_WINDOWS and text_bytes is None:
        windows = min(windows, BUILTIN_EVAL_WINDOWS[name])
    return min(windows, max_windows) if max_windows is not None else windows


def estimate(config: dict[str, Any], job: JobSize, *, parameters: int | None = None) -> Estimate | None:
    """The job's peak memory, or None when the config does not give the model's sizes (or the
    arithmetic fails). ``parameters``: the loaded model's exact count (the worker knows it), else
    from the config. A config whose sizes are no sizes gives an ``Estimate`` that is refused."""
    if isinstance(config, UnreadableConfig):
        return Estimate(
            total=0, weights=0, activations=0, block=0, parts=(), advice="", field=("model",), problem=config.problem
        )
    try:
        shape = ModelShape.from_config(config)
        if shape is None:
            return None
        return _sized(shape, job, parameters)
    except UnusableConfig as err:
        return Estimate(
            total=0,
            weights=0,
            activations=0,
            block=0,
            parts=(),
            advice="",
            field=("model",),
            problem=f"{err}; fix the model's config.json",
        )
    except (ArithmeticError, ValueError, TypeError):  # (sizes are bounded: not expected) the worker's then
        return None


def _sized(shape: ModelShape, job: JobSize, parameters: int | None) -> Estimate:
    # Long on purpose: one term per memory item (weights, activations, Hessians, the solve, evaluation), each with the
    # words that explain it.
    size = ITEMSIZE.get(job.dtype, 4)
    dtype = f"{size} bytes ({job.dtype})"
    seqlen = job.seqlen or min(DEFAULT_SEQLEN, shape.context or DEFAULT_SEQLEN)
    params = parameters or shape.params
    if job.mapped:  # the blocks' weights are file pages; what lies outside them is counted
        outside = min(params, shape.outside_blocks_params)
        weights = outside * size
        parts = [
            f"model weights outside the blocks {_gb(weights)} = {outside / 1e9:.3g} B parameters x {dtype} "
            f"(embeddings, head), in host memory; the blocks' {_gb((params - outside) * size)} stay "
            "memory-mapped from the checkpoint's files (not counted)"
        ]
    else:
        weights = params * size
        parts = [f"model weights {_gb(weights)} = {params / 1e9:.3g} B parameters x {dtype}, in host memory"]

    calibrated = reads_calibration(job.method)
    calibration = job.nsamples * seqlen * shape.hidden * size if calibrated else 0
    windows = {name: _eval_windows(name, nbytes, seqlen, job.max_windows) for name, nbytes in job.eval_sets}
    worst = max(windows, key=windows.get, default=None)
    evaluation = windows[worst] * seqlen * shape.hidden * size if worst is not None else 0
    cal_text = (
        f"calibration activations {_gb(calibration)} = {job.nsamples} samples x {seqlen} tokens x "
        f"{shape.hidden} hidden x {dtype}"
    )
    eval_text = (
        f"evaluation activations {_gb(evaluation)} = {windows.get(worst, 0)} windows of {worst} x "
        f"{seqlen} tokens x {shape.hidden} hidden x {dtype}"
    )
    if calibration >= evaluation:
        activations, field = calibration, ("calibration", "nsamples")
        advice = "lower nsamples or seqlen"
        parts.insert(0, cal_text)
    else:
        activations, field = evaluation, ("evaluation", "max_windows")
        advice = "lower evaluation.max_windows or seqlen"
        parts.insert(0, eval_text)

    chunk_tokens = max(1, TOKENS_PER_CHUNK.get(job.device, 2048) // seqlen) * seqlen
    forward = chunk_tokens * (6 * shape.hidden + 3 * shape.intermediate) * size
    logits = 3 * LOGIT_TOKENS * shape.vocab * 4 if windows else 0
    hessians = shape.hessian_bytes if calibrated else 0  # a method without calibration data collects none
    block = hessians + shape.solve_bytes + max(forward, logits) + shape.block_params * size
    parts.append(
        f"one block in flight {_gb(block)} (its fp32 Hessians and solve, a chunk of {chunk_tokens} tokens, "
        f"{'its weights on the GPU' if job.device == 'cuda' else 'the copy of its weights it is pruned on'})"
    )
    total = weights + activations + block
    if weights + block > activations:
        field = ("model",)
        advice = "use a smaller model, or a worker with more memory and a higher limit"
        if not job.mapped and job.stored and job.stored != job.dtype:
            field = ("dtype",)
            advice = (
                f"set dtype to {job.stored} (or auto on a GPU), the dtype its checkpoint stores: its weights "
                f"then stay memory-mapped from the files instead of converted into host memory; or {advice}"
            )
    return Estimate(
        total=total,
        weights=weights,
        activations=activations,
        block=block,
        parts=tuple(parts),
        advice=advice,
        field=field,
    )


# --- the model's config ----------------------------------------------------------------------
