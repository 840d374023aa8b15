"""One pruning job from start to end, as named steps, each timed: load, calibrate, evaluate the
dense model, prune, evaluate, save.

``run_job(spec, RunOptions(...), on_progress=..., should_cancel=...)`` is what the CLI and the
Celery worker call; ``spec`` is the job spec (``worker.engine.contract.spec.JobSpec``) with its datasets
resolved to built-in names or file paths. ``run`` returns the report (``worker.engine.contract.report.Report``),
``run_job`` its JSON form (a dict, as the report file holds it). The report names each path the
run read or wrote as ``RunOptions.labels`` names it (the worker: ``upload:3``, the model as the user
gave it, the archive's name), so it and the model card are written once, with the user's names.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from worker.engine.contract.report import Report, Timings
from worker.engine.contract.spec import JobSpec
from worker.engine.job_run import JobRun, RunOptions  # RunOptions: also this module's interface, as before
from worker.engine.progress import CancelCheck, ProgressCallback, Tracker
from worker.engine.quantized_job import compress_for_evaluation, quantization_part


def _stages(spec: JobSpec, options: RunOptions) -> list[str]:
    evaluate = bool(spec.evaluation.datasets)
    saved_first = spec.quantization is not None and bool(options.output)  # evaluated as saved
    return (
        ["loading", "calibrating"]
        + (["evaluating_dense"] if evaluate and spec.evaluation.dense else [])
        + (["evaluating_tasks_dense"] if spec.evaluation.tasks and spec.evaluation.dense else [])
        + ["pruning"]
        + (["saving"] if saved_first else [])
        + (["evaluating"] if evaluate else [])
        + (["evaluating_tasks"] if spec.evaluation.tasks else [])
        + (["saving"] if options.output and not saved_first else [])
    )


def run_job(
    spec: JobSpec,
    options: RunOptions | None = None,
    *,
    on_progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    on_loaded: Callable[[dict], None] | None = None,
) -> dict:
    """``run``'s report as the report file holds it (a dict): for scripts that read it as JSON."""
    return run(spec, options, on_progress=on_progress, should_cancel=should_cancel, on_loaded=on_loaded).to_dict()


def run(
    spec: JobSpec,
    options: RunOptions | None = None,
    *,
    on_progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    on_loaded: Callable[[dict], None] | None = None,
) -> Report:
    """Run the job ``spec`` describes; returns the report. Raises EngineError subclasses for what a
    user can fix. ``on_loaded(facts)``, once the model is loaded and before calibrating, gets its
    config (a dict), parameter count, working dtype, device kind, seqlen and whether the weights
    stay memory-mapped (``mapped``, worker.engine.checkpoint.load_model); it may raise to stop
    the job (the worker checks the job's memory estimate there)."""
    # Long on purpose: the job's stages in the order they run (load, calibrate, evaluate, prune, evaluate, save).
    options = options or RunOptions()
    options.validate(spec)
    run = JobRun(spec, options, Tracker(on_progress, should_cancel, _stages(spec, options), options.labels))
    torch.set_float32_matmul_precision("highest")  # TF32 changes the solve's results
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    evaluate = bool(spec.evaluation.datasets)
    with run.timed("load"):
        run.load()
    if on_loaded is not None:
        on_loaded(
            {
                "config": run.model.config.to_dict(),
                "parameters": run.parameters,
                "dtype": str(run.dtype).replace("torch.", ""),
                "device": run.device.type,
                "seqlen": run.seqlen,
                "mapped": run.model.sparsegpt_mapped,
                "stored": run.model.sparsegpt_stored,
            }
        )
    with run.timed("data"):
        run.calibrate()
    with run.timed("profile"):  # OWL's pass over the dense model; nothing to do for the others
        run.profile()
    if spec.sparsity_profile != "owl":
        del run.seconds["profile"]
    dense_ppl = {}
    if evaluate and spec.evaluation.dense:
        with run.timed("eval_dense"):
            dense_ppl = run.evaluate("evaluating_dense", "dense")
    if spec.evaluation.tasks and spec.evaluation.dense:
        with run.timed("zero_shot_dense"):
            run.evaluate_tasks("evaluating_tasks_dense", "dense")
    with run.timed("prune"):
        layers = run.prune()

    def evaluated() -> Report:  # the pruned model's figures and the report
        pruned_ppl = {}
        if evaluate:
            with run.timed("eval_pruned"):
                pruned_ppl = run.evaluate("evaluating", "pruned")
        if spec.evaluation.tasks:
            with run.timed("zero_shot_pruned"):
                run.evaluate_tasks("evaluating_tasks", "pruned")
        run.seconds["eval"] = run.seconds.get("eval_dense", 0.0) + run.seconds.get("eval_pruned", 0.0)
        report = run.report(layers, dense_ppl, pruned_ppl)
        if spec.solver.refit != "none":
            run.seconds["refit"] = report.refit.seconds  # inside seconds.prune
        return report

    if run.quantization is not None and options.output:
        report = run.save(evaluated)  # written first: the figures are those of the model as saved
    elif run.quantization is not None:
        compress_for_evaluation(run.model, run.quantization, run.quantized)  # evaluated as it would load
        report = evaluated()
        report.quantization = quantization_part(
            spec,
            run.quantization,
            run.quantized,
            run.model,
            report.coverage.dense if report.coverage else [],
            run.parameters,
        )
    else:
        report = evaluated()
        if options.output:
            run.save(lambda: report)
    run.seconds["total"] = time.perf_counter() - run.start
    report.seconds = Timings(**run.seconds)
    run.tracker.emit(1.0, message="done")
    return report
