"""The pruned model's card (README.md): huggingface_hub's ``ModelCard`` with metadata made by its
``ModelCardData``/``EvalResult`` helpers (``base_model`` only for a Hub id, the base model's license
when its card or config says it, tags for the method, pattern and quantization, the perplexity and
any zero-shot accuracy as ``model-index``), then what was done and how to do it again.

No torch here; it reads the typed report (``worker.engine.contract.report``; a report file's dict is read as
one), leaving out the sections a report lacks, and lists the report's fields marked for the card.
The card names no path of the machine that ran the job: a local model is ``./<its directory name>``,
a data file its file name (an upload: ``upload-<sha256 prefix>.txt``, its whole sha256 beside), and
the reproduce command uses those names, so that it runs as written where those files are.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load, try_to_load_from_cache
from pydantic import BaseModel

from worker.engine.contract.report import Calibration, Report, Solver, as_report, facts
from worker.engine.contract.spec_fields import leaf_fields
from worker.engine.contract.spec_sections import BUILTIN_DATASETS, upload_id
from worker.engine.quant_text import card_section

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATASET_TYPES = {"wikitext2": "wikitext", "c4": "allenai/c4", "ptb": "ptb_text_only"}
_LICENSE_KEYS = ("license", "license_name", "license_link")


def hub_id(model: Any) -> str | None:
    """The model's Hub id, or None for a local directory, a file or an upload."""
    text = str(model or "")
    if not text or text.startswith(("/", "./", "../", "~")) or text.endswith(".gguf") or ":" in text:
        return None
    return text if _HUB_ID.match(text) and ".." not in text else None


def data_files(names: Iterable[str], label: Callable[[str], str | None]) -> dict[str, dict[str, str]]:
    """The sha256 and suffix of each data file among ``names`` (built-in sets are not files), keyed by
    ``label(path)``: the report's ``files``, which the card names a file by."""
    out: dict[str, dict[str, str]] = {}
    for name in dict.fromkeys(names):
        path = Path(name)
        if name in BUILTIN_DATASETS or not path.is_file():
            continue
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        out[str(label(name))] = {"sha256": digest.hexdigest(), "suffix": path.suffix.lower()}
    return out


def base_license(model: Any, revision: str | None = None) -> dict[str, str]:
    """``license`` (with ``license_name`` and an absolute ``license_link`` when given) from the base
    model's card front matter, else its config.json: a local directory's files, or a Hub model's
    files only when they are in the local cache. Never a network call; {} when nothing says."""
    hub = hub_id(model)
    for filename in ("README.md", "config.json"):
        if hub is not None:
            cached = try_to_load_from_cache(hub, filename, revision=revision)
            path = Path(cached) if isinstance(cached, str) else None
        else:
            path = Path(str(model or "")) / filename if str(model or "").startswith("/") else None
        if path is None or not path.is_file():
            continue
        try:
            meta = metadata_load(path) if filename == "README.md" else json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("license"), str) and meta["license"].strip():
            found = {k: meta[k].strip() for k in _LICENSE_KEYS if isinstance(meta.get(k), str) and meta[k].strip()}
            if not found.get("license_link", "").startswith(("https://", "http://")):
                found.pop("license_link", None)  # a link relative to the base's repository leads nowhere here
            return found
    return {}


def pattern_tag(pattern: Any) -> str | None:
    """``2:4`` as it is; an unstructured ratio (0.5, or an old report's 50%) as ``unstructured-50``."""
    text = str(pattern or "").strip()
    if not text or ":" in text:
        return text or None
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        return None
    percent = value if text.endswith("%") or value > 1 else 100 * value
    return f"unstructured-{percent:g}"


def quantization_scheme(report: Report) -> str | None:
    """The report's quantization scheme (W4A16, FP8_DYNAMIC, ...) when it has one; the reference's
    joint quantization (solver.wbits) as ``w<bits>``."""
    value = getattr(report, "quantization", None) or (report.spec or {}).get("quantization")
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, Mapping):
        value = value.get("scheme")
    if isinstance(value, str) and value.strip() and value.strip().lower() != "none":
        return value.strip()
    wbits = report.solver.wbits if report.solver else None
    return f"w{wbits}" if wbits else None


def tags(report: Report) -> list[str]:
    extra = (report.method, pattern_tag(report.pattern), quantization_scheme(report))
    return list(dict.fromkeys(["sparsegpt", "pruned", "sparse", *(str(t) for t in extra if t)]))


def public_names(report: Report) -> dict[str, str]:
    """What the card calls the model and each data file the report names: a local model
    ``./<directory name>``, a file by its file name, an upload by its content (``upload-<sha256[:12]>``).
    A Hub id and a built-in set are named as they are (not in the mapping)."""
    names: dict[str, str] = {}
    model = str(report.model or "")
    if model and hub_id(model) is None:
        names[model] = "./" + PurePosixPath(model).name
    spec = report.spec or {}
    sets = [
        report.calibration.dataset if report.calibration else None,
        *report.files,
        *report.perplexity,
        *report.dense_perplexity,
        (spec.get("calibration") or {}).get("dataset"),
        *((spec.get("evaluation") or {}).get("datasets") or []),
    ]
    for name in (str(s) for s in sets if s):
        if name in BUILTIN_DATASETS or name in names:
            continue
        held = report.files.get(name)
        if upload_id(name) is not None:
            suffix = (held.suffix if held else None) or ".txt"
            tag = held.sha256[:12] if held and held.sha256 else upload_id(name)  # an old report: no digest
            names[name] = f"upload-{tag}{suffix}"
        else:
            names[name] = PurePosixPath(name).name
    return names


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


def reproduce_command(spec: dict, names: Mapping[str, str] | None = None) -> str:
    """The ``sparsegpt prune`` command line that runs ``spec`` (flags left out are the defaults);
    ``names``: what to call the model and data files in it (``public_names``), else as the spec has them."""
    names = names or {}

    def name(value: Any) -> str:
        return names.get(str(value), str(value))

    parts = ["sparsegpt", "prune", shlex.quote(name(spec.get("model")))]
    for leaf in leaf_fields():
        if not leaf.ui.cli:
            continue
        value: Any = spec
        for key in leaf.path:
            value = value.get(key) if isinstance(value, dict) else None
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
            parts += [leaf.ui.cli, shlex.quote(name(value) if leaf.path == ("calibration", "dataset") else str(value))]
    datasets = (spec.get("evaluation") or {}).get("datasets")
    if datasets == []:
        parts.append("--no-eval")
    for dataset in datasets or []:
        parts += ["--eval", shlex.quote(name(dataset))]
    return " ".join(parts)


def _service_spec(spec: dict, names: Mapping[str, str]) -> dict:
    """The spec as a job of another service would take it: each local model or file as a path
    there (``/path/to/<name>``), since an upload's id and this server's paths mean nothing elsewhere."""
    where = {k: "/path/to/" + v.removeprefix("./") for k, v in names.items()}
    out = {**spec, "model": where.get(str(spec.get("model")), spec.get("model"))}
    if isinstance(spec.get("calibration"), dict):
        dataset = spec["calibration"].get("dataset")
        out["calibration"] = {**spec["calibration"], "dataset": where.get(str(dataset), dataset)}
    if isinstance(spec.get("evaluation"), dict):
        out["evaluation"] = {
            **spec["evaluation"],
            "datasets": [where.get(str(d), d) for d in spec["evaluation"].get("datasets") or []],
        }
    return out


def card_data(report: Report | Mapping[str, Any]) -> ModelCardData:
    report = as_report(report)
    base, names = hub_id(report.model), public_names(report)
    name = f"{PurePosixPath(str(report.model)).name}-{report.method}-{report.pattern}".replace(":", "of")
    results = []
    for dataset, ppl in report.perplexity.items():
        if _number(ppl) is not None:
            shown_as = names.get(dataset, dataset)
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=_DATASET_TYPES.get(dataset, shown_as),
                    dataset_name=shown_as,
                    metric_type="perplexity",
                    metric_value=round(ppl, 4),
                    metric_name="perplexity (pruned)",
                )
            )
    for task, acc in accuracies(report).items():
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=task,
                dataset_name=task,
                metric_type="accuracy",
                metric_value=round(acc["pruned"], 4),
                metric_name="zero-shot accuracy (pruned)",
            )
        )
    return ModelCardData(
        library_name="transformers",
        base_model=base,
        tags=tags(report),
        model_name=name if results else None,
        eval_results=results or None,
        **base_license(report.model, report.revision),
    )


def _data_lines(report: Report, names: Mapping[str, str]) -> list[str]:
    """Each data file the reproduce command reads, with its sha256 (the files are not in the artifact)."""
    lines = []
    for label, held in report.files.items():
        what = "uploaded file" if upload_id(label) is not None else "file"
        lines.append(f"- `{names.get(label, label)}`: the {what} the job read, sha256 `{held.sha256}`")
    if not lines:
        return []
    return [
        "The data files are not part of this model; put the same bytes (check them with `sha256sum`) "
        "beside the command:",
        "",
        *lines,
        "",
    ]


def model_card(report: Report | Mapping[str, Any]) -> str:
    """The README.md of the saved model."""
    # Long on purpose: the card's sections in the order a reader meets them, like a template.
    report = as_report(report)
    data, names = card_data(report), public_names(report)
    cal, solver = report.calibration or Calibration(), report.solver or Solver()
    dense, pruned = report.dense_perplexity, report.perplexity
    model, method, pattern = report.model, report.method, report.pattern
    title = PurePosixPath(str(model)).name
    source = f"[{model}](https://huggingface.co/{model})" if data.base_model else f"a local model ({title})"
    held = report.files.get(str(cal.dataset))
    calibration = names.get(str(cal.dataset), str(cal.dataset)) + (f" (sha256 {held.sha256})" if held else "")
    bits = solver.wbits or (report.quantization.bits if report.quantization else None)
    lines = [
        f"# {title} pruned with {method} ({pattern})",
        "",
        f"One-shot pruned, without retraining, by sparsegpt-service from {source}.",
        "",
        f"- Method: **{method}**, pattern **{pattern}**, achieved sparsity "
        f"{float(report.sparsity or 0):.4f} over the pruned Linear layers (embeddings and lm_head are dense).",
        f"- Calibration: {calibration}, {cal.nsamples} samples of {cal.seqlen} tokens, seed {cal.seed}.",
        f"- Solver: blocksize {solver.blocksize}, percdamp {solver.percdamp}, weight bits "
        f"{bits or 'none (not quantized)'}{', exact (the reference arithmetic)' if solver.exact else ''}.",
        *(f"- {label[:1].upper()}{label[1:]}: {text}." for label, text in facts(report, "card")),
        "",
        *(
            card_section(report.quantization)
            if report.quantization
            else [
                "**This is a dense checkpoint with zeros.** The pruned weights are stored as explicit zeros in "
                "ordinary safetensors files: it loads anywhere `AutoModelForCausalLM.from_pretrained` works, at the "
                "dense model's size and speed. A speed-up needs a runtime with sparse kernels (for 2:4, NVIDIA's "
                "semi-structured sparsity on Ampere or newer GPUs); the zeros also compress well.",
                "",
            ]
        ),
    ]
    if pruned:
        lines += ["## Perplexity", "", "| evaluation set | dense | pruned |", "|---|---|---|"]
        lines += [f"| {names.get(n, n)} | {_fmt(dense.get(n))} | {_fmt(ppl)} |" for n, ppl in pruned.items()] + [""]
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
        local = " (the base model's directory beside it)" if str(model) in names else ""
        lines += [
            "## Reproduce",
            "",
            f"With the engine alone{local}:",
            "",
            "```bash",
            reproduce_command(report.spec, names),
            "```",
            "",
            *_data_lines(report, names),
            "Or as a job of the service (`POST /api/v1/jobs`; a local model or data file by its path on "
            "that server, or a data file as `upload:<id>` once uploaded there):",
            "",
            "```json",
            json.dumps(_service_spec(report.spec, names), indent=2),
            "```",
            "",
        ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _fmt(value: Any) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.4f}" if number < 1.5 else f"{number:.3f}"
