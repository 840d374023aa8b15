"""The pruned model's card (README.md): huggingface_hub's ``ModelCard`` with metadata made by its
``ModelCardData``/``EvalResult`` helpers (``base_model`` only for a Hub id, the perplexity and
any zero-shot accuracy as ``model-index``), then what was done and how to do it again.

No torch here; the report is read generically (sections it lacks are left out).
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import PurePosixPath
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

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


def accuracies(report: dict) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy per task as {task: {"pruned": a, "dense": b}} from whichever report
    key holds it ("zero_shot...", "...accuracy...", "tasks"), shaped {task: acc},
    {task: {"pruned"/"acc"/...: acc, "dense": acc}} or {"pruned": {task: acc}, "dense": {...}}."""
    out: dict[str, dict[str, float]] = {}
    for key, value in report.items():
        lowered = key.lower()
        if not isinstance(value, dict) or not ("zero_shot" in lowered or "accuracy" in lowered or lowered == "tasks"):
            continue
        dense_key = "dense" in lowered
        if isinstance(value.get("pruned"), dict) and all(isinstance(value.get(w, {}), dict) for w in ("pruned", "dense")):
            for which in ("pruned", "dense"):  # {"pruned": {task: acc}, "dense": ..., other keys}
                for task, acc in (value.get(which) or {}).items():
                    if _number(_pick(acc)) is not None:
                        out.setdefault(str(task), {})[which] = _number(_pick(acc))
            continue
        for task, acc in value.items():
            if isinstance(acc, dict) and ("dense" in acc or "pruned" in acc):
                for which in ("pruned", "dense"):
                    if _number(_pick(acc.get(which))) is not None:
                        out.setdefault(str(task), {})[which] = _number(_pick(acc.get(which)))
            elif _number(_pick(acc)) is not None:
                out.setdefault(str(task), {})["dense" if dense_key else "pruned"] = _number(_pick(acc))
    return {task: v for task, v in out.items() if "pruned" in v}


def _pick(value: Any) -> Any:
    """A number, or the accuracy in an lm-eval style result dict (acc, acc_norm, 'acc,none')."""
    if isinstance(value, dict):
        for key in ("acc", "acc,none", "accuracy", "acc_norm", "acc_norm,none", "value"):
            if _number(value.get(key)) is not None:
                return value[key]
        return None
    return value


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


def card_data(report: dict) -> ModelCardData:
    base = hub_id(report.get("model"))
    name = f"{PurePosixPath(str(report.get('model'))).name}-{report.get('method')}-{report.get('pattern')}".replace(":", "of")
    results = []
    for dataset, ppl in (report.get("perplexity") or {}).items():
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


def model_card(report: dict) -> str:
    """The README.md of the saved model."""
    data = card_data(report)
    cal = report.get("calibration") or {}
    solver = report.get("solver") or {}
    dense, pruned = report.get("dense_perplexity") or {}, report.get("perplexity") or {}
    model = report.get("model")
    title = PurePosixPath(str(model)).name
    source = f"[{model}](https://huggingface.co/{model})" if data.base_model else f"a local model ({title})"
    lines = [f"# {title} pruned with {report.get('method')} ({report.get('pattern')})", "",
             f"One-shot pruned, without retraining, by sparsegpt-service from {source}.", "",
             f"- Method: **{report.get('method')}**, pattern **{report.get('pattern')}**, achieved sparsity "
             f"{float(report.get('sparsity') or 0):.4f} over the pruned Linear layers (embeddings and lm_head are dense).",
             f"- Calibration: {cal.get('dataset')}, {cal.get('nsamples')} samples of {cal.get('seqlen')} tokens, "
             f"seed {cal.get('seed')}.",
             f"- Solver: blocksize {solver.get('blocksize')}, percdamp {solver.get('percdamp')}, weight bits "
             f"{solver.get('wbits') or 'none (not quantized)'}{', exact (the reference arithmetic)' if solver.get('exact') else ''}.",
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
    for layer in report.get("layers") or []:
        blocks.setdefault(layer["block"], []).append(layer["sparsity"])
    if blocks:
        lines += ["## Sparsity per block", "", "| block | sparsity |", "|---|---|"]
        lines += [f"| {b} | {sum(v) / len(v):.4f} |" for b, v in sorted(blocks.items())] + [""]
    spec = report.get("spec")
    if isinstance(spec, dict):
        lines += ["## Reproduce", "", "With the engine alone:", "", "```bash", reproduce_command(spec), "```", "",
                  "Or as a job of the service (`POST /api/v1/jobs`):", "", "```json", json.dumps(spec, indent=2),
                  "```", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _fmt(value: Any) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.4f}" if number < 1.5 else f"{number:.3f}"
