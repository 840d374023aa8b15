"""One job's run: how it is carried out (``RunOptions``) and the state its steps share (``JobRun``),
each step a method: load, calibrate, profile, evaluate, prune, save, report.
``worker.engine.pipeline.run`` calls the steps in order and times them.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from worker.engine.architectures import LayerSelection, adapter_for
from worker.engine.calibration import calibration_windows, check_hub, evaluation_windows, is_named, read_text_file
from worker.engine.card import data_files, model_card
from worker.engine.checkpoint import context_length, load_model, resolve_device, resolve_dtype, save_pruned
from worker.engine.contract.method_table import method_info
from worker.engine.contract.report import Environment, Report, Timings
from worker.engine.contract.spec import JobSpec
from worker.engine.contract.spec_sections import upload_id
from worker.engine.coverage import check_prunable, coverage, weight_name
from worker.engine.errors import InvalidJob
from worker.engine.moe import MoeSettings
from worker.engine.owl import block_targets, check_profile
from worker.engine.progress import Tracker
from worker.engine.quantized_job import (
    check_quantizable,
    formats_of,
    quantization_of,
    quantization_part,
    settle_sizes,
    writers,
)
from worker.engine.refit import refit_summary
from worker.engine.resume import Checkpoints, fingerprint
from worker.engine.sequential import LayerResult, SolverSettings, perplexity, prune_sequential
from worker.engine.zeroshot import ZeroShot

DEFAULT_SEQLEN = 2048  # the reference's; capped by the model's context
# Tokens per block forward. Enough to keep the matmuls busy; on the CPU small enough that a
# chunk's attention and MLP temporaries stay a fraction of the model (they set the peak RSS).
TOKENS_PER_CHUNK = {"cuda": 16_384, "cpu": 2_048}


@dataclass
class RunOptions:
    """How this run is carried out, as opposed to what the job is (the spec)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output: str | None = None  # directory for the pruned model; None: not saved
    token: str | None = None  # Hub token for gated models (else HF_TOKEN)
    batch_size: int | None = None  # sequences per block forward; None: ~16k tokens on CUDA, 2k on the CPU
    resume_dir: str | None = None  # per-block checkpoints (worker.engine.resume): a rerun of the job resumes there
    task_dirs: tuple[str, ...] = ()  # directories of lm-eval task YAMLs that evaluation.tasks may name
    # What the report and the card call a path this run read or wrote (a dataset file -> upload:3,
    # the model's resolved directory -> the path as given, the output -> the archive's name); others as they are.
    labels: dict[str, str] = field(default_factory=dict)
    # The saved model's formats (worker.engine.quantized_job.FORMATS): "compressed-tensors" (quantized jobs'
    # default) and/or "dense" (float; the default without quantization). Two: output/<format>/ each.
    formats: tuple[str, ...] = ()

    def label(self, path: str | None) -> str | None:
        return None if path is None else self.labels.get(str(path), str(path))

    def validate(self, spec: JobSpec) -> None:
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise InvalidJob(f"batch_size must be an integer of at least 1, got {self.batch_size!r}")
        if spec.solver.exact and self.batch_size not in (None, 1):
            raise InvalidJob("exact runs one sequence per forward, as the reference: leave batch_size unset")
        for name in (spec.calibration.dataset, *spec.evaluation.datasets):
            if upload_id(name) is not None:
                raise InvalidJob(f"{name} names an upload of the service; the engine reads a built-in set or a file")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def environment(device: torch.device) -> Environment:
    import transformers

    env = Environment(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        device=str(device),
        cpu_threads=torch.get_num_threads(),
    )
    if device.type == "cuda":
        env.gpu, env.cuda = torch.cuda.get_device_name(device), torch.version.cuda
    return env


class JobRun:
    """The state one job's steps share; each step is a method, timed into ``seconds``."""

    def __init__(self, spec: JobSpec, options: RunOptions, tracker: Tracker):
        self.spec, self.options, self.tracker = spec, options, tracker
        self.device = resolve_device(options.device)
        # dtype auto on a GPU follows the checkpoint (known once its config is read, in load)
        gpu_auto = spec.dtype == "auto" and self.device.type == "cuda"
        self.dtype = None if gpu_auto else resolve_dtype(spec.dtype, self.device)
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()
        self.eval_windows: dict[str, torch.Tensor] = {}  # tokenized when first needed, then kept
        ev = spec.evaluation
        self.zero_shot = ZeroShot(
            ev.tasks, limit=ev.task_limit, batch_size=ev.task_batch_size, task_dirs=options.task_dirs
        )

    @contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def load(self) -> None:
        spec = self.spec
        self.tracker.begin("loading", f"loading {spec.model}")
        self.zero_shot.prepare()  # an unknown task or unreadable task data fails before the model loads
        calibrates = spec.reads_calibration
        hub_sets = [*([spec.calibration.dataset] if calibrates else []), *spec.evaluation.datasets]
        if spec.model.startswith("/"):
            check_hub(*hub_sets)  # no Hub, no built-in set: said before the load, not after
        self.model, self.tokenizer = load_model(
            spec.model,
            dtype=self.dtype,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            token=self.options.token,
        )
        self.dtype = self.model.sparsegpt_dtype
        self.parameters = sum(p.numel() for p in self.model.parameters())  # as loaded (a quantized save compresses)
        check_hub(*hub_sets)  # (a Hub model's own check came first)
        self.adapter = adapter_for(self.model)
        self.selection = LayerSelection(**spec.layers.model_dump())
        self.selection.validate(len(self.adapter.blocks))
        check_prunable(self.adapter, self.selection)
        check_profile(spec.sparsity_profile, len(self.adapter.blocks))
        self.quantization = quantization_of(spec, self.dtype)
        self.formats = formats_of(self.options.formats, self.quantization)
        if self.quantization is not None:
            check_quantizable(self.quantization, self.model, self.adapter, self.selection)
        context = context_length(self.model, self.tokenizer)
        self.seqlen = spec.calibration.seqlen or min(DEFAULT_SEQLEN, context or DEFAULT_SEQLEN)
        if context is not None and self.seqlen > context:
            raise InvalidJob(f"seqlen {self.seqlen} is longer than the model's context of {context} tokens")
        self.batch_size = self.options.batch_size or max(1, TOKENS_PER_CHUNK[self.device.type] // self.seqlen)

    def calibrate(self) -> None:
        cal = self.spec.calibration
        self.tracker.begin("calibrating", f"sampling {cal.nsamples} windows of {self.seqlen} tokens from {cal.dataset}")
        self.calibration = None
        if self.spec.reads_calibration:  # the method's statistics or OWL's scores need activations
            self.calibration = calibration_windows(
                self.tokenizer, cal.dataset, nsamples=cal.nsamples, seqlen=self.seqlen, seed=cal.seed
            )
        for name in self.spec.evaluation.datasets:  # fail now, not after the prune, on a missing or empty file
            if not is_named(name):
                read_text_file(name)

    def profile(self) -> None:
        """The per-block targets of a non-uniform profile (OWL: one pass over the dense model)."""
        spec = self.spec
        self.targets, self.profile_info = block_targets(
            spec.sparsity_profile,
            sparsity=spec.pattern.sparsity,
            m=spec.owl.m,
            lam=spec.owl.lambda_,
            model=self.model,
            adapter=self.adapter,
            calibration=self.calibration,
            selection=self.selection,
            device=self.device,
            batch_size=self.batch_size,
            tracker=self.tracker,
        )

    def evaluate(self, stage: str, label: str) -> dict[str, float]:
        self.tracker.begin(stage, f"{label} perplexity")
        result = {}
        for name in self.spec.evaluation.datasets:
            if name not in self.eval_windows:
                self.eval_windows[name] = evaluation_windows(
                    self.tokenizer, name, seqlen=self.seqlen, max_windows=self.spec.evaluation.max_windows
                )
            result[name] = perplexity(
                self.model,
                self.adapter,
                self.eval_windows[name],
                device=self.device,
                batch_size=self.batch_size,
                tracker=self.tracker,
                label=f"{label} {name}",
            )
        return result

    def evaluate_tasks(self, stage: str, key: str) -> None:
        self.tracker.begin(stage, f"{key} zero-shot")
        self.zero_shot.evaluate(
            key, self.model, self.tokenizer, self.adapter, device=self.device, tracker=self.tracker, label=key
        )

    def prune(self) -> list[LayerResult]:
        spec = self.spec
        self.tracker.begin("pruning", f"{spec.method} {spec.pattern}")
        solver = SolverSettings(
            method=spec.method,
            pattern=spec.pattern,
            blocksize=spec.solver.blocksize,
            percdamp=spec.solver.percdamp,
            wbits=spec.solver.wbits,
            exact=spec.solver.exact,
            refit=spec.solver.refit,
            quantization=self.quantization,
            # A quantizing SparseGPT solve takes each Linear's Hessian from the solved Linears before it, in
            # one pass per block (GPTQ's true-sequential order); pruning alone keeps the reference's two
            # passes (every Hessian from the dense block), as does the bit-for-bit mode.
            one_pass=self.quantization is not None
            and method_info(spec.method).joint_quantization
            and not spec.solver.exact,
        )
        self.quantized = {}  # with quantization: codes and scales by module name (experts: moe.expert_key)
        batch = 1 if spec.solver.exact else self.batch_size  # the reference's one sequence per forward
        self.experts: list[dict] = []  # per experts module: routed tokens and Hessian source per expert
        self.two_passes: dict[int, str] = {}  # block -> why it ran twice where one pass was asked
        layers = prune_sequential(
            self.model,
            self.adapter,
            self.calibration,
            solver=solver,
            selection=self.selection,
            device=self.device,
            batch_size=batch,
            tracker=self.tracker,
            targets=self.targets,
            expert_records=self.experts,
            moe=MoeSettings(all_experts=spec.moe.all_experts, min_tokens=spec.moe.min_tokens),
            checkpoints=self.checkpoints(batch),
            quantized=self.quantized,
            two_passes=self.two_passes,
        )
        self.peak_prune_rss = _peak_rss_bytes()
        # measured now: a quantized model is compressed before it is evaluated (compressed-tensors' modules)
        self.coverage = coverage(self.model, self.adapter, self.selection, [r.name for r in layers])
        self.layer_sizes = [self.model.get_parameter(weight_name(r.name, self.model)).numel() for r in layers]
        return layers

    def checkpoints(self, batch: int) -> Checkpoints | None:
        if not self.options.resume_dir:
            return None
        return Checkpoints(
            self.options.resume_dir,
            fingerprint(
                spec=self.spec.model_dump(mode="json"),
                dtype=self.dtype,
                device=self.device,
                batch_size=batch,
                calibration=self.calibration,
                blocks=len(self.adapter.blocks),
            ),
        )

    def save(self, make_report: Callable[[], Report]) -> Report:
        """Write the formats, then ``make_report()`` (a quantized job evaluates there: the model as saved)
        goes into each directory with the card. Returns the report; the evaluation inside is not saving."""
        self.tracker.begin("saving", f"saving to {self.options.output}")
        t0 = time.perf_counter()
        made: list[Report] = []
        inner = [0.0]

        def finish(directories: dict) -> dict:  # called once the weights are written: the report says what it cost
            t1 = time.perf_counter()
            report = make_report()
            inner[0] = time.perf_counter() - t1
            self.seconds["save"] = time.perf_counter() - t0 - inner[0]
            if self.quantization is not None:
                report.quantization = quantization_part(
                    self.spec,
                    self.quantization,
                    self.quantized,
                    self.model,
                    report.coverage.dense if report.coverage else [],
                    self.parameters,
                    report.layers,
                    self.two_passes,
                )
            self.seconds["total"] = time.perf_counter() - self.start
            report.seconds = Timings(**self.seconds)
            if self.quantization is not None:  # the sizes as the directories will hold them, card and report too
                settle_sizes(report, directories, lambda d: [model_card(d), json.dumps(d, indent=2)])
            made.append(report)
            return report.to_dict()

        save_pruned(
            self.model,
            self.tokenizer,
            self.options.output,
            finish,
            writers(self.model, self.formats, self.quantization, self.quantized),
        )
        self.seconds["save"] = time.perf_counter() - t0 - inner[0]
        return made[0]

    def report(self, layers: list[LayerResult], dense_ppl: dict, pruned_ppl: dict) -> Report:
        """The report; each path it names is named as ``options.labels`` says (the walk's one place)."""
        # Long on purpose: the typed report's fields assembled in one call, each from where the run keeps it.
        spec, device, label = self.spec, self.device, self.options.label
        sizes = self.layer_sizes
        used = [r.percdamp for r in layers]
        per_block: dict[int, list] = {}
        for r, n in zip(layers, sizes):
            per_block.setdefault(r.block, []).append((r, n))
        nblocks = len(self.adapter.blocks)
        public = spec.model_copy(update={"model": label(spec.model)}).with_datasets(label)
        ev = spec.evaluation
        return Report(
            model=public.model,
            revision=spec.revision,
            method=spec.method,
            pattern=str(spec.pattern),
            # sparsity: zeros / every weight of the pruned blocks; sparsity_pruned_modules; coverage: what stayed dense
            **self.coverage,
            experts=getattr(self, "experts", []),  # per experts module: routed tokens, Hessian source per expert
            profile={
                **self.profile_info,  # per block (None: not pruned); each weighted by its Linears' sizes
                "targets": [per_block[b][0][0].target if b in per_block else None for b in range(nblocks)],
                "achieved": [
                    sum(r.sparsity * n for r, n in per_block[b]) / sum(n for _, n in per_block[b])
                    if b in per_block
                    else None
                    for b in range(nblocks)
                ],
            },
            calibration={**public.calibration.model_dump(), "seqlen": self.seqlen},
            files=data_files([spec.calibration.dataset, *spec.evaluation.datasets], label),  # their sha256
            solver={
                "blocksize": spec.solver.blocksize,
                "percdamp": spec.solver.percdamp,
                "percdamp_max_used": max(used, default=0.0),  # 0.0: no layer was dampened
                "wbits": spec.solver.wbits,
                "exact": spec.solver.exact,
                "refit": spec.solver.refit,
            },
            refit=refit_summary(spec.solver.refit, layers, sizes),
            layers_selected=spec.layers.model_dump(),
            evaluation={
                "datasets": list(public.evaluation.datasets),
                "max_windows": ev.max_windows,
                "windows": {label(k): int(v.shape[0]) for k, v in self.eval_windows.items()},
            },
            dense_perplexity={label(k): v for k, v in dense_ppl.items()},
            perplexity={label(k): v for k, v in pruned_ppl.items()},
            seconds=Timings(**self.seconds),
            peak_memory_bytes=(
                torch.cuda.max_memory_allocated(device) if device.type == "cuda" else self.peak_prune_rss
            ),
            peak_rss_bytes=_peak_rss_bytes(),
            dtype=str(self.dtype).replace("torch.", ""),
            layers=[r.as_dict() for r in layers],
            environment=environment(device),
            spec=public.model_dump(mode="json"),
            run={
                "device": self.options.device,
                "output": label(self.options.output),
                "batch_size": self.options.batch_size,
                "task_dirs": [label(d) for d in self.options.task_dirs],
            },
            output=label(self.options.output) if self.options.output else None,
            zero_shot=self.zero_shot.report(),  # None without evaluation.tasks
            quantization=None,  # a quantized job's part is added once its model is saved or compressed
        )
