"""The command line's summary of a finished run: a report (``worker.engine.contract.report.Report``)
in a few lines of text (``sparsegpt prune`` prints it; the tests read it).
"""

from __future__ import annotations

from worker.engine.contract.report import Refit, Report, ZeroShot, as_report
from worker.engine.coverage_text import coverage_lines, sparsity_headline
from worker.engine.quant_text import quantization_lines


def summary(report: Report | dict) -> str:
    """What the run did, in a few lines (a report file's dict is read as a report)."""
    report = as_report(report)
    seconds, peak = report.seconds, report.peak_memory_bytes or 0
    lines = [
        f"{report.method} {report.pattern}: {sparsity_headline(report.to_dict())}, "
        f"prune {seconds.prune or 0:.1f} s, total {seconds.total or 0:.1f} s, peak memory {peak / 2**30:.2f} GiB"
    ]
    profile = report.profile
    if profile is not None and profile.profile in ("owl", "list"):
        rows = [
            (b, t, a)
            for b, (t, a) in enumerate(zip(profile.targets, profile.achieved))
            if t is not None and a is not None
        ]
        extra = f", M {profile.m:g}, lambda {profile.lambda_:g}" if profile.profile == "owl" else ""
        lines.append(
            f"sparsity profile {profile.profile}{extra} (the overall sparsity above is weighted by "
            "parameters); block: target -> achieved"
        )
        lines.append("  " + ", ".join(f"{b}: {t:.3f} -> {a:.3f}" for b, t, a in rows))
    lines += _refit_lines(report.refit)
    selected = report.layers_selected
    if selected is not None and (
        selected.first_block is not None or selected.last_block is not None or selected.include or selected.exclude
    ):
        first, last = selected.first_block, selected.last_block
        parts = [f"blocks {'first' if first is None else first}..{'last' if last is None else last}"]
        parts += [
            f"{key} {', '.join(globs)}"
            for key, globs in (("include", selected.include), ("exclude", selected.exclude))
            if globs
        ]
        lines.append(
            f"layer selection ({'; '.join(parts)}): the modules it leaves out stay dense (inside the "
            "pruned blocks they count in the first sparsity above; blocks outside the range do not)"
        )
    lines += coverage_lines(report.to_dict())
    for name, ppl in report.perplexity.items():
        dense = report.dense_perplexity.get(name)
        before = f"{dense:.3f} -> " if dense is not None else ""
        lines.append(f"perplexity {name}: {before}{ppl:.3f}" if ppl is not None else f"perplexity {name}: not finite")
    lines += zero_shot_lines(report.zero_shot)
    lines += quantization_lines(report.quantization)
    if report.output:
        lines.append(saved_line(report))
    return "\n".join(lines)


def saved_line(report: Report) -> str:
    """Where the model went, in which format(s)."""
    q = report.quantization
    formats = list(q.sizes.formats) if q is not None and q.sizes else []
    if len(formats) > 1:
        return f"saved to {report.output}: " + ", ".join(f"{report.output}/{f}" for f in formats)
    if formats == ["compressed-tensors"]:
        return (
            f"saved to {report.output} (compressed-tensors, {q.scheme}: loads with from_pretrained, runs in vllm serve)"
        )
    if q is not None:
        return f"saved to {report.output} (dense safetensors: the quantized weights as floats)"
    return f"saved to {report.output} (a dense safetensors checkpoint with zeros)"


def _refit_lines(refit: Refit | None) -> list[str]:
    if refit is None:
        return []
    lines = []
    if refit.layers:
        lines.append(
            f"refit {refit.mode}: mean reconstruction error {refit.error_before:.4f} -> "
            f"{refit.error_after:.4f} over {refit.layers} layers, {refit.swaps} swaps, "
            f"{refit.seconds:.1f} s (within the prune)"
        )
    if refit.not_refit:
        lines.append(
            f"refit left alone {len(refit.not_refit)} pruned layers (no calibration Hessian): "
            + ", ".join(refit.not_refit[:8])
            + (" ..." if len(refit.not_refit) > 8 else "")
        )
    return lines


def zero_shot_lines(zero_shot: ZeroShot | dict | None) -> list[str]:
    """One line per task and metric: dense -> pruned (acc, acc_norm and the like; no stderr)."""
    if isinstance(zero_shot, dict):
        zero_shot = ZeroShot.model_validate(zero_shot)
    if not zero_shot:
        return []
    lines = []
    for task, values in zero_shot.pruned.items():
        for metric, value in values.items():
            if metric.endswith("_stderr") or "_stderr," in metric or value is None:
                continue
            before = zero_shot.dense.get(task, {}).get(metric)
            n = zero_shot.examples.get(task)
            lines.append(
                f"zero-shot {task} {metric}: {'' if before is None else f'{before:.4f} -> '}{value:.4f}"
                + (f" ({n} examples)" if n else "")
            )
    return lines
