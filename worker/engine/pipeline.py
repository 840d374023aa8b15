"""One pruning job from start to end: load, calibrate, evaluate dense, prune, evaluate, save.

``run_job(PruneJob(...), on_progress=..., should_cancel=...)`` is what the CLI and the
Celery worker call; it returns the report (a JSON-able dict).
"""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import asdict, dataclass, field

import torch

from worker.engine.architectures import LayerSelection, adapter_for
from worker.engine.calibration import calibration_windows, evaluation_windows, is_named, read_text_file
from worker.engine.checkpoint import context_length, load_model, resolve_device, resolve_dtype, save_pruned
from worker.engine.errors import InvalidJob
from worker.engine.patterns import parse_sparsity
from worker.engine.progress import CancelCheck, ProgressCallback, Tracker
from worker.engine.sequential import METHODS, SolverSettings, perplexity, prune_sequential

DEFAULT_SEQLEN = 2048  # the reference's; capped by the model's context
# Tokens per block forward. Enough to keep the matmuls busy; on the CPU small enough that a
# chunk's attention and MLP temporaries stay a fraction of the model (they set the peak RSS).
TOKENS_PER_CHUNK = {"cuda": 16_384, "cpu": 2_048}


@dataclass
class PruneJob:
    model: str  # a Hub id or a local directory (or .gguf file)
    sparsity: str | float = 0.5  # 0.5, or "2:4" (N zeros in every M)
    method: str = "sparsegpt"  # sparsegpt | wanda | magnitude
    revision: str | None = None
    trust_remote_code: bool = False
    token: str | None = None  # Hub token for gated models (else HF_TOKEN)
    calibration: str = "c4"  # c4 | wikitext2 | ptb | a .txt/.jsonl file
    nsamples: int = 128
    seqlen: int | None = None  # None: min(2048, the model's context)
    seed: int = 0
    blocksize: int = 128
    percdamp: float = 0.01
    wbits: int | None = None  # joint quantization to this many bits (2..8), paper section 5
    eval_sets: list[str] = field(default_factory=lambda: ["wikitext2"])
    eval_windows: int | None = None  # at most this many windows per evaluation set
    eval_dense: bool = True  # also measure the dense model, for the before/after table
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # compute and saved dtype: auto (fp16 on CUDA, fp32 on CPU) | float16 | bfloat16 | float32
    output: str | None = None  # directory for the pruned model; None: not saved
    first_block: int | None = None
    last_block: int | None = None
    include: list[str] = field(default_factory=list)  # fnmatch patterns on full module names
    exclude: list[str] = field(default_factory=list)
    batch_size: int | None = None  # sequences per block forward; None: ~16k tokens
    # Reproduce the reference's arithmetic bit for bit: one sequence per forward, its running
    # Hessian per layer, its dampening, inverse and column loop. Slower; for checking results.
    exact: bool = False

    def validate(self) -> None:
        """Raise InvalidJob for anything wrong that is knowable before loading the model."""
        if self.method not in METHODS:
            raise InvalidJob(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        pattern = parse_sparsity(self.sparsity)
        for name, value, low in (("nsamples", self.nsamples, 1), ("blocksize", self.blocksize, 1),
                                 ("seqlen", self.seqlen, 2), ("eval_windows", self.eval_windows, 1),
                                 ("batch_size", self.batch_size, 1)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise InvalidJob(f"{name} must be an integer of at least {low}, got {value!r}")
        if not 0 < self.percdamp <= 1:
            raise InvalidJob(f"percdamp must be in (0, 1], got {self.percdamp}")
        if self.wbits is not None and not 2 <= self.wbits <= 8:
            raise InvalidJob(f"wbits must be between 2 and 8, got {self.wbits}")
        if self.wbits is not None and self.method != "sparsegpt":
            raise InvalidJob("joint quantization (wbits) is part of the SparseGPT solver only")
        if self.exact and self.method != "sparsegpt":
            raise InvalidJob("exact reproduces the reference SparseGPT; it applies to method sparsegpt only")
        if self.exact and self.batch_size not in (None, 1):
            raise InvalidJob("exact runs one sequence per forward, as the reference: leave batch_size unset")
        if pattern.structured and self.method == "sparsegpt" and self.blocksize % pattern.m:
            raise InvalidJob(f"blocksize {self.blocksize} must be a multiple of M={pattern.m} for {pattern}")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def environment(device: torch.device) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": str(device),
           "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def run_job(job: PruneJob, *, on_progress: ProgressCallback | None = None,
            should_cancel: CancelCheck | None = None) -> dict:
    """Run ``job``; returns the report. Raises EngineError subclasses for what a user can fix."""
    job.validate()
    pattern = parse_sparsity(job.sparsity)
    device = resolve_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    evaluate = bool(job.eval_sets)
    stages = ["loading", "calibrating"] + (["evaluating_dense"] if evaluate and job.eval_dense else []) \
        + ["pruning"] + (["evaluating"] if evaluate else []) + (["saving"] if job.output else [])
    tracker = Tracker(on_progress, should_cancel, stages)
    torch.set_float32_matmul_precision("highest")  # TF32 changes the solve's results
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()

    tracker.begin("loading", f"loading {job.model}")
    model, tokenizer = load_model(job.model, dtype=dtype, revision=job.revision,
                                  trust_remote_code=job.trust_remote_code, token=job.token)
    adapter = adapter_for(model)
    selection = LayerSelection(job.first_block, job.last_block, list(job.include), list(job.exclude))
    selection.validate(len(adapter.blocks))
    context = context_length(model, tokenizer)
    seqlen = job.seqlen or min(DEFAULT_SEQLEN, context or DEFAULT_SEQLEN)
    if context is not None and seqlen > context:
        raise InvalidJob(f"seqlen {seqlen} is longer than the model's context of {context} tokens")
    batch_size = job.batch_size or max(1, TOKENS_PER_CHUNK[device.type] // seqlen)
    prune_batch = 1 if job.exact else batch_size  # the reference's one sequence per forward
    seconds["load"] = time.perf_counter() - t_start

    tracker.begin("calibrating", f"sampling {job.nsamples} windows of {seqlen} tokens from {job.calibration}")
    t0 = time.perf_counter()
    calibration = None
    if job.method != "magnitude":
        calibration = calibration_windows(tokenizer, job.calibration, nsamples=job.nsamples,
                                          seqlen=seqlen, seed=job.seed)
    for name in job.eval_sets:  # fail now, not after the prune, on a missing or empty file
        if not is_named(name):
            read_text_file(name)
    seconds["data"] = time.perf_counter() - t0
    eval_windows: dict[str, torch.Tensor] = {}  # tokenized when first needed, then kept

    def measure(stage: str, label: str) -> dict[str, float]:
        tracker.begin(stage, f"{label} perplexity")
        result = {}
        for name in job.eval_sets:
            if name not in eval_windows:
                eval_windows[name] = evaluation_windows(tokenizer, name, seqlen=seqlen,
                                                        max_windows=job.eval_windows)
            result[name] = perplexity(model, adapter, eval_windows[name], device=device,
                                      batch_size=batch_size, tracker=tracker, label=f"{label} {name}")
        return result

    t0 = time.perf_counter()
    dense_ppl = measure("evaluating_dense", "dense") if evaluate and job.eval_dense else {}
    seconds["eval_dense"] = time.perf_counter() - t0

    tracker.begin("pruning", f"{job.method} {pattern}")
    t0 = time.perf_counter()
    solver = SolverSettings(method=job.method, pattern=pattern, blocksize=job.blocksize,
                            percdamp=job.percdamp, wbits=job.wbits, exact=job.exact)
    layers = prune_sequential(model, adapter, calibration, solver=solver, selection=selection,
                              device=device, batch_size=prune_batch, tracker=tracker)
    seconds["prune"] = time.perf_counter() - t0
    peak_prune_rss = _peak_rss_bytes()

    t0 = time.perf_counter()
    pruned_ppl = measure("evaluating", "pruned") if evaluate else {}
    seconds["eval"] = time.perf_counter() - t0 + seconds["eval_dense"]

    zeros = sum(r.sparsity * _numel(model, r.name) for r in layers)
    total = sum(_numel(model, r.name) for r in layers)
    report = {
        "model": job.model, "revision": job.revision, "method": job.method, "pattern": str(pattern),
        "sparsity": zeros / total if total else 0.0,
        "calibration": {"dataset": job.calibration, "nsamples": job.nsamples, "seqlen": seqlen,
                        "seed": job.seed},
        "solver": {"blocksize": job.blocksize, "percdamp": job.percdamp, "wbits": job.wbits},
        "evaluation": {"datasets": list(job.eval_sets), "max_windows": job.eval_windows,
                       "windows": {k: int(v.shape[0]) for k, v in eval_windows.items()}},
        "dense_perplexity": dense_ppl, "perplexity": pruned_ppl,
        "seconds": seconds,
        "peak_memory_bytes": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                              else peak_prune_rss),
        "peak_rss_bytes": _peak_rss_bytes(),
        "dtype": str(dtype).replace("torch.", ""),
        "layers": [r.as_dict() for r in layers],
        "environment": environment(device),
        "job": {k: v for k, v in asdict(job).items() if k != "token"},
        "output": None,
    }
    if job.output:
        tracker.begin("saving", f"saving to {job.output}")
        t0 = time.perf_counter()
        report["output"] = str(job.output)
        seconds["save"] = 0.0
        seconds["total"] = time.perf_counter() - t_start
        save_pruned(model, tokenizer, job.output, report)
        seconds["save"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    tracker.emit(1.0, message="done")
    return report


def _numel(model: torch.nn.Module, name: str) -> int:
    return model.get_submodule(name).weight.numel()
