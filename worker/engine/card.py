"""The pruned model's card (README.md): huggingface_hub's ``ModelCard`` with metadata made by its
``ModelCardData``/``EvalResult`` helpers (``base_model`` only for a Hub id, the perplexity and
any zero-shot accuracy as ``model-index``), then what was done and how to do it again.

No torch here; it reads the typed report (``worker.engine.report``; a report file's dict is read as
one), leaving out the sections a report lacks, and lists the report's fields marked for the card.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from worker.engine.report import Calibration, Report, Solver, as_report, facts
from worker.engine.spec_fields import leaf_fields

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATASET_TYPES = {"wikitext2": "wikitext", "c4": "allenai/c4", "ptb": "ptb_text_only"}


def hub_id(model: Any) -> str | None:
    """The model's Hub id, or None for a local directory, a file or an upload."""
    text = str(model or "")
    if not text or text.startswith(("/", "./", "../", "~")) or text.endswith(".gguf") or ":" in text:
        return None
    return text if _HUB_ID.match(text) and ".." not in text else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def accuracies(report: Report | Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy per task as {task: {"pruned": a, "dense": b}}: the first accuracy metric
    lm-eval gave (acc, then acc_norm and the like) of each task the pruned model was measured on."""
    zero_shot = as_report(report).zero_shot
    if zero_shot is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    for which, per_task in (("pruned", zero_shot.pruned), ("dense", zero_shot.dense)):
        for task, values in per_task.items():
            acc = _pick(values)
            if acc is not None and (which == "pruned" or task in out):
                out.setdefault(str(task), {})[which] = acc
    return out


def _pick(values: Mapping[str, Any]) -> float | None:
    """The accuracy among a task's metrics (acc, acc_norm, ...; lm-eval's 'acc,none' too)."""
    for key in ("acc", "acc,none", "accuracy", "acc_norm", "acc_norm,none"):
        if _number(values.get(key)) is not None:
            return _number(values[key])
    return None


def reproduce_command(spec: dict) -> str:
    """The ``sparsegpt prune`` command line that runs ``spec`` (flags left out are the defaults)."""
    parts = ["sparsegpt", "prune", shlex.quote(str(spec.get("model")))]
    for leaf in leaf_fields():
        if not leaf.ui.cli:
            continue
        value: Any = spec
        for name in leaf.path:
            value = value.get(name) if isinstance(value, dict) else None
        if value is None or (value == leaf.default and not leaf.required):
            continue
        if leaf.kind == "bool":
            if value != leaf.default:
                parts.append(leaf.ui.cli)
        elif isinstance(value, list) and leaf.path == ("sparsity_profile",):
            parts += [leaf.ui.cli, ",".join(str(v) for v in value)]
        elif isinstance(value, list):
            for item in value:
                parts += [leaf.ui.cli, shlex.quote(str(item))]
        else:
            parts += [leaf.ui.cli, shlex.quote(str(value))]
    datasets = (spec.get("evaluation") or {}).get("datasets")
    if datasets == []:
        parts.append("--no-eval")
    for name in datasets or []:
        parts += ["--eval", shlex.quote(str(name))]
    return " ".join(parts)


def card_data(report: Report | Mapping[str, Any]) -> ModelCardData:
    report = as_report(report)
    base = hub_id(report.model)
    name = f"{PurePosixPath(str(report.model)).name}-{report.method}-{report.pattern}".replace(":", "of")
    results = []
    for dataset, ppl in report.perplexity.items():
        if _number(ppl) is not None:
            results.append(EvalResult(task_type="text-generation", dataset_type=_DATASET_TYPES.get(dataset, dataset),
                                      dataset_name=dataset, metric_type="perplexity", metric_value=round(ppl, 4),
                                      metric_name="perplexity (pruned)"))
    for task, acc in accuracies(report).items():
        results.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                  metric_type="accuracy", metric_value=round(acc["pruned"], 4),
                                  metric_name="zero-shot accuracy (pruned)"))
    return ModelCardData(library_name="transformers", base_model=base, tags=["sparsegpt", "pruned", "sparse"],
                         model_name=name if results else None, eval_results=results or None)


def model_card(report: Report | Mapping[str, Any]) -> str:
    """The README.md of the saved model."""
    report = as_report(report)
    data = card_data(report)
    cal, solver = report.calibration or Calibration(), report.solver or Solver()
    dense, pruned = report.dense_perplexity, report.perplexity
    model, method, pattern = report.model, report.method, report.pattern
    title = PurePosixPath(str(model)).name
    source = f"[{model}](https://huggingface.co/{model})" if data.base_model else f"a local model ({title})"
    lines = [f"# {title} pruned with {method} ({pattern})", "",
             f"One-shot pruned, without retraining, by sparsegpt-service from {source}.", "",
             f"- Method: **{method}**, pattern **{pattern}**, achieved sparsity "
             f"{float(report.sparsity or 0):.4f} over the pruned Linear layers (embeddings and lm_head are dense).",
             f"- Calibration: {cal.dataset}, {cal.nsamples} samples of {cal.seqlen} tokens, seed {cal.seed}.",
             f"- Solver: blocksize {solver.blocksize}, percdamp {solver.percdamp}, weight bits "
             f"{solver.wbits or 'none (not quantized)'}{', exact (the reference arithmetic)' if solver.exact else ''}.",
             *(f"- {label[:1].upper()}{label[1:]}: {text}." for label, text in facts(report, "card")),
             "", "**This is a dense checkpoint with zeros.** The pruned weights are stored as explicit zeros in "
             "ordinary safetensors files: it loads anywhere `AutoModelForCausalLM.from_pretrained` works, at the "
             "dense model's size and speed. A speed-up needs a runtime with sparse kernels (for 2:4, NVIDIA's "
             "semi-structured sparsity on Ampere or newer GPUs); the zeros also compress well.", ""]
    if pruned:
        lines += ["## Perplexity", "", "| evaluation set | dense | pruned |", "|---|---|---|"]
        lines += [f"| {name} | {_fmt(dense.get(name))} | {_fmt(ppl)} |" for name, ppl in pruned.items()] + [""]
    acc = accuracies(report)
    if acc:
        lines += ["## Zero-shot accuracy", "", "| task | dense | pruned |", "|---|---|---|"]
        lines += [f"| {task} | {_fmt(v.get('dense'))} | {_fmt(v['pruned'])} |" for task, v in acc.items()] + [""]
    blocks: dict[int, list[float]] = {}
    for layer in report.layers:
        if layer.block is not None and layer.sparsity is not None:
            blocks.setdefault(layer.block, []).append(layer.sparsity)
    if blocks:
        lines += ["## Sparsity per block", "", "| block | sparsity |", "|---|---|"]
        lines += [f"| {b} | {sum(v) / len(v):.4f} |" for b, v in sorted(blocks.items())] + [""]
    if report.spec is not None:
        lines += ["## Reproduce", "", "With the engine alone:", "", "```bash", reproduce_command(report.spec), "```",
                  "", "Or as a job of the service (`POST /api/v1/jobs`):", "", "```json",
                  json.dumps(report.spec, indent=2), "```", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _fmt(value: Any) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.4f}" if number < 1.5 else f"{number:.3f}"
