"""The "New plan" form (templates/new_plan.html) <-> the body POST /api/v1/plans takes, without a
server (tests/web/test_plan_form.py).

The form's inputs: a name; the model, its revision and dtype; the calibration text (a built-in
set, an uploaded file or a file on the server) with its samples, length and seed; the evaluation
sets, windows and zero-shot tasks; then either a GRID (the settings to run: sparsities as
checkboxes and a free text field, methods, quantization schemes, refit off/on) or a BUDGET (the
same candidates, searched in order of size, and a perplexity or accuracy limit); the group size
and act order every quantized point shares; the priority.

Values as the form shows them: text a stripped string, a checkbox a bool, a checkbox group a list
of the checked values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.web import forms
from worker.engine.contract.spec_sections import BUILTIN_DATASETS

SPARSITIES = ("0", "0.3", "0.4", "0.5", "0.6", "2:4", "4:8")
SCHEMES = ("none", "W8A16", "W4A16", "FP8_DYNAMIC")
REFITS = ("off", "on")
METRICS = ("perplexity", "accuracy")
PRIORITIES = ("normal", "low")
MODES = ("grid", "budget")
CALIBRATION_SOURCES = (*BUILTIN_DATASETS, "upload", "path")
TEXT = (
    "name",
    "model",
    "revision",
    "dtype",
    "calibration_source",
    "calibration_upload",
    "calibration_path",
    "nsamples",
    "seqlen",
    "seed",
    "eval_extra",
    "max_windows",
    "eval_tasks",
    "task_limit",
    "mode",
    "sparsities_extra",
    "quant_group_size",
    "budget_metric",
    "max_increase_pct",
    "max_drop_points",
    "priority",
)
GROUPS = ("eval_sets", "sparsities", "methods", "quantization", "refit")
CHECKS = ("quant_actorder",)

DEFAULTS: dict[str, Any] = {
    **{name: forms.FORM_DEFAULTS.get(name, "") for name in TEXT},
    "name": "",
    "calibration_source": forms.FORM_DEFAULTS.get("calibration_source", "c4"),
    "eval_sets": list(forms.FORM_DEFAULTS.get("eval_sets") or []),
    "quant_group_size": "128",
    "quant_actorder": False,
    "mode": "grid",
    "sparsities": ["0", "0.5", "2:4"],
    "sparsities_extra": "",
    "methods": ["sparsegpt"],
    "quantization": ["none", "W4A16"],
    "refit": ["off"],
    "budget_metric": "perplexity",
    "max_increase_pct": "10",
    "max_drop_points": "2",
    "priority": "normal",
}

# The form's help where the job spec describes the same input (the API docs' words).
HELP: dict[str, str] = {
    name: forms.HELP.get(name, "")
    for name in ("model", "revision", "dtype", "nsamples", "seqlen", "seed", "max_windows", "eval_tasks", "task_limit")
}
HELP.update(
    methods=forms.HELP.get("method", ""),
    sparsities=forms.HELP.get("sparsity", ""),
    quantization=forms.HELP.get("quant_scheme", ""),
    quant_group_size=forms.HELP.get("quant_group_size", ""),
    quant_actorder=forms.HELP.get("quant_actorder", ""),
    refit=forms.HELP.get("refit", ""),
)


def values_of(fields: Mapping[str, list[str]]) -> dict[str, Any]:
    """The submitted fields ({name: [values]}) as the form shows them again."""

    def text(name: str) -> str:
        sent = fields.get(name) or [""]
        return sent[0].strip()

    values: dict[str, Any] = {name: text(name) for name in TEXT}
    values.update({name: [v.strip() for v in fields.get(name, []) if v.strip()] for name in GROUPS})
    values.update({name: name in fields for name in CHECKS})
    return values


def _number_or_text(text: str) -> Any:
    """A number typed into a text input, as JSON would carry it (the body's model checks the rest)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _optional(body: dict[str, Any], key: str, text: str) -> None:
    if text != "":
        body[key] = _number_or_text(text)


def candidates(values: Mapping[str, Any]) -> dict[str, Any]:
    """The settings to try (a grid, or a budget's candidates)."""
    sparsities = list(values.get("sparsities") or [])
    sparsities += [s for s in forms.split_list(values.get("sparsities_extra", "")) if s and s not in sparsities]
    return {
        "sparsities": sparsities,
        "methods": list(values.get("methods") or []),
        "quantization": [None if s == "none" else s for s in values.get("quantization") or []],
        "refit": [r == "on" for r in values.get("refit") or []],
    }


def body_of(values: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body POST /api/v1/plans would take for these form values. Empty optional inputs
    are left out (the server's defaults apply); the body's own model checks every value."""
    calibration: dict[str, Any] = {"dataset": forms.calibration_dataset(values)}
    for key in ("nsamples", "seqlen", "seed"):
        _optional(calibration, key, values.get(key, ""))
    evaluation: dict[str, Any] = {"datasets": forms.evaluation_datasets(values)}
    _optional(evaluation, "max_windows", values.get("max_windows", ""))
    _optional(evaluation, "task_limit", values.get("task_limit", ""))
    tasks = [t for t in forms.split_list(values.get("eval_tasks", "")) if t]
    if tasks:
        evaluation["tasks"] = tasks
    body: dict[str, Any] = {"model": values.get("model", "")}
    for key in ("name", "revision", "dtype"):
        if values.get(key):
            body[key] = values[key]
    body.update(calibration=calibration, evaluation=evaluation, priority=values.get("priority") or "normal")
    if any(s != "none" for s in values.get("quantization") or []):
        _optional(body, "group_size", values.get("quant_group_size", ""))
        body["actorder"] = bool(values.get("quant_actorder"))
    if values.get("mode") == "budget":
        budget: dict[str, Any] = {"metric": values.get("budget_metric") or "perplexity"}
        limit = "max_drop_points" if budget["metric"] == "accuracy" else "max_increase_pct"
        budget[limit] = _number_or_text(values.get(limit, ""))
        body["budget"] = {**budget, **candidates(values)}
    else:
        body["grid"] = candidates(values)
    return body


def choice_errors(values: Mapping[str, Any]) -> dict[str, list[str]]:
    """What the body cannot say about the form's own inputs: the radio buttons and selects."""
    errors: dict[str, list[str]] = {}
    source = values.get("calibration_source")
    if source not in CALIBRATION_SOURCES:
        errors["calibration_source"] = ["choose where the calibration text comes from"]
    elif source == "upload" and not values.get("calibration_upload"):
        errors["calibration_source"] = ["choose one of the uploaded files"]
    elif source == "path" and not values.get("calibration_path"):
        errors["calibration_source"] = ["give the file's path on the server"]
    if values.get("mode") not in MODES:
        errors["mode"] = ["choose a grid of settings or a budget"]
    elif values.get("mode") == "budget" and values.get("budget_metric") not in METRICS:
        errors["budget_metric"] = ["choose perplexity or accuracy"]
    if values.get("priority") not in PRIORITIES:
        errors["priority"] = ["choose normal or low"]
    return errors


# Where an error of the body is shown: its path's first keys -> the form's input.
_FIELD_OF = {
    ("calibration", "dataset"): "calibration_source",
    ("calibration", "nsamples"): "nsamples",
    ("calibration", "seqlen"): "seqlen",
    ("calibration", "seed"): "seed",
    ("evaluation", "datasets"): "eval_sets",
    ("evaluation", "max_windows"): "max_windows",
    ("evaluation", "tasks"): "eval_tasks",
    ("evaluation", "task_limit"): "task_limit",
    ("group_size",): "quant_group_size",
    ("actorder",): "quant_actorder",
    ("budget", "metric"): "budget_metric",
    ("budget", "max_increase_pct"): "max_increase_pct",
    ("budget", "max_drop_points"): "max_drop_points",
    ("model",): "model",
    ("name",): "name",
    ("revision",): "revision",
    ("dtype",): "dtype",
    ("priority",): "priority",
}
for _section in ("grid", "budget"):
    _FIELD_OF.update(
        {
            (_section, "sparsities"): "sparsities",
            (_section, "methods"): "methods",
            (_section, "quantization"): "quantization",
            (_section, "refit"): "refit",
        }
    )


def field_of(path: tuple[Any, ...]) -> str:
    """The input an error at this body path is shown by ("" for the form as a whole)."""
    keys = tuple(str(k) for k in path if not isinstance(k, int))
    if keys and keys[0] == "body":
        keys = keys[1:]
    for size in range(len(keys), 0, -1):
        if keys[:size] in _FIELD_OF:
            return _FIELD_OF[keys[:size]]
    return ""


def field_errors(errors: list[dict[str, Any]]) -> dict[str, list[str]]:
    """pydantic error entries -> {input: [messages]}."""
    out: dict[str, list[str]] = {}
    for error in errors:
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        out.setdefault(field_of(tuple(error.get("loc") or ())), []).append(message)
    return out
