"""The new-job form <-> the job spec, without a server (tests/dashboard/test_form_mapping.py).

Every field of ``worker.engine.contract.spec.JobSpec`` that has a form name (``UI(form=...)``, listed by
``leaf_fields()``) maps by itself, by its path in the spec and its kind: a checkbox for a bool,
comma-separated text for a list, text for the rest. A new spec field therefore needs a change
in the spec module, an input in templates/new_job.html and a test, nothing here.

Two inputs are compound and written by hand below: the calibration source (radio buttons
c4 / wikitext2 / ptb / upload / file / path, with ``calibration_upload``, ``calibration_path``
and the ``calibration_file`` to upload) -> ``calibration.dataset``, and the evaluation sets
(``eval_sets`` checkboxes and the ``eval_extra`` text) -> ``evaluation.datasets``.

Values as the form shows them: text is a stripped string ("" for None), a checkbox a bool,
``eval_sets`` a list of the checked sets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from worker.engine.contract.spec import JobSpec, get_path, set_path
from worker.engine.contract.spec_fields import Leaf, error_path, leaf_fields, plain_message
from worker.engine.contract.spec_sections import BUILTIN_DATASETS, CalibrationSpec, EvaluationSpec, upload_id

LEAVES: tuple[Leaf, ...] = tuple(leaf for leaf in leaf_fields() if leaf.ui.form)
CHOICES: dict[str, tuple[str, ...]] = {leaf.ui.form: leaf.choices for leaf in LEAVES if leaf.choices}
CALIBRATION_SOURCES = (*BUILTIN_DATASETS, "upload", "file", "path")
CALIBRATION = ("calibration", "dataset")
OPTIONAL_SECTIONS = tuple(
    name
    for name, f in JobSpec.model_fields.items()
    if f.default is None and any(leaf.path[0] == name and len(leaf.path) > 1 for leaf in LEAVES)
)


# The inputs' help text: the spec's own field descriptions (the form says what the API docs say).
def _form_help(description: str) -> str:
    """A spec description as the form's help: a sentence, and an empty input where the API says null."""
    text = description.replace("null:", "empty:").replace("[]:", "empty:")
    return text[:1].upper() + text[1:]


HELP: dict[str, str] = {leaf.ui.form: _form_help(leaf.info.description or "") for leaf in LEAVES}
EVALUATION = ("evaluation", "datasets")

# Where an error of the spec is shown: each leaf's own input, and the two compound inputs.
_FIELD_OF_PATH: dict[tuple[str, ...], str] = {
    **{leaf.path: leaf.ui.form for leaf in LEAVES},
    CALIBRATION: "calibration_source",
    EVALUATION: "eval_sets",
    ("quantization",): "quant_scheme",  # the section as a whole (no scheme, its cross-field checks)
}
_MISSING = object()
_SEPARATORS = re.compile(r"\s*,?\s*\n\s*|\s*,\s*")  # a comma, line breaks, or both


def _shown(leaf: Leaf, value: Any) -> str | bool:
    """A spec value as its input shows it."""
    if leaf.kind == "bool":
        return bool(value)
    if value is None:
        return ""
    if leaf.kind == "list":
        return ", ".join(map(str, value))
    return str(value)


def split_list(text: str) -> list[str]:
    """Text separated by commas or lines as a list ("a, b", "a,\\nb", "a\\nb"; a comma at
    either end is dropped). An empty item between two commas stays, for the spec to say what
    is wrong with it: a stray comma is pointed out rather than guessed at."""
    text = text.strip().strip(",").strip()
    return [item.strip() for item in _SEPARATORS.split(text)] if text else []


# --- the two compound inputs ---------------------------------------------------------------------


def calibration_inputs(dataset: str) -> dict[str, str]:
    """The calibration source's inputs for a dataset reference."""
    if dataset in BUILTIN_DATASETS:
        return {"calibration_source": dataset, "calibration_upload": "", "calibration_path": ""}
    if upload_id(dataset) is not None:
        return {"calibration_source": "upload", "calibration_upload": dataset, "calibration_path": ""}
    return {"calibration_source": "path", "calibration_upload": "", "calibration_path": dataset}


def calibration_dataset(values: Mapping[str, Any]) -> str:
    """``calibration.dataset`` from the source's inputs (a "file" is stored first: see actions)."""
    source = values.get("calibration_source", "")
    return {"upload": values.get("calibration_upload", ""), "path": values.get("calibration_path", "")}.get(
        source, source
    )


def calibration_choice_errors(values: Mapping[str, Any]) -> dict[str, list[str]]:
    """What the spec cannot say about the radio buttons: none chosen, or "an uploaded file"
    without one picked."""
    source = values.get("calibration_source", "")
    if source not in CALIBRATION_SOURCES:
        return {"calibration_source": ["choose where the calibration text comes from"]}
    if source == "upload" and not values.get("calibration_upload"):
        return {"calibration_source": ["choose one of the uploaded files"]}
    return {}


def evaluation_inputs(datasets: list[str]) -> dict[str, Any]:
    """The built-in sets as checkboxes, the others (uploads, paths) as text."""
    return {
        "eval_sets": [d for d in datasets if d in BUILTIN_DATASETS],
        "eval_extra": ", ".join(d for d in datasets if d not in BUILTIN_DATASETS),
    }


def evaluation_datasets(values: Mapping[str, Any]) -> list[str]:
    extra = [item for item in split_list(values.get("eval_extra", "")) if item]
    return [*values.get("eval_sets", []), *extra]


# --- the whole form ------------------------------------------------------------------------------


def _default_of(leaf: Leaf) -> Any:
    """A leaf's starting value: a required field's ``suggested`` one, nothing in a section that is
    null by default (quantization: an empty group size takes the scheme's own), else its default."""
    if leaf.path[0] in OPTIONAL_SECTIONS:
        return None
    return leaf.ui.suggested if leaf.required else leaf.default


def _defaults() -> dict[str, Any]:
    """The spec's defaults as the form shows them."""
    values = {leaf.ui.form: _shown(leaf, _default_of(leaf)) for leaf in LEAVES}
    values.update(calibration_inputs(CalibrationSpec().dataset))
    values.update(evaluation_inputs(EvaluationSpec().datasets))
    return values


FORM_DEFAULTS: dict[str, Any] = _defaults()


def form_values(fields: Mapping[str, list[str]]) -> dict[str, Any]:
    """The submitted fields (``uploads.Received.fields``), as the form shows them again; a
    checkbox is on when its name was sent."""

    def text(name: str) -> str:
        sent = fields.get(name) or [""]
        return sent[0].strip()

    values: dict[str, Any] = {
        leaf.ui.form: (leaf.ui.form in fields) if leaf.kind == "bool" else text(leaf.ui.form) for leaf in LEAVES
    }
    for name in ("calibration_source", "calibration_upload", "calibration_path", "eval_extra"):
        values[name] = text(name)
    values["eval_sets"] = [value.strip() for value in fields.get("eval_sets", [])]
    return values


def spec_body(values: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body POST /api/v1/jobs would take. An empty optional input is left out, so the
    spec's default applies; the spec itself parses and checks the text."""
    body: dict[str, Any] = {}
    for leaf in LEAVES:
        value = values.get(leaf.ui.form, "")
        if leaf.kind == "bool":
            set_path(body, leaf.path, bool(value))
        elif value != "" or leaf.required:
            set_path(body, leaf.path, split_list(value) if leaf.kind == "list" else value)
    set_path(body, CALIBRATION, calibration_dataset(values))
    set_path(body, EVALUATION, evaluation_datasets(values))
    return body


def form_from_spec(stored: dict[str, Any]) -> dict[str, Any]:
    """The form's values for a stored spec (Clone); what it lacks keeps the form's default."""
    values = dict(FORM_DEFAULTS)
    for leaf in LEAVES:
        value = get_path(stored, leaf.path, _MISSING)
        if value is not _MISSING:
            values[leaf.ui.form] = _shown(leaf, value)
    dataset = get_path(stored, CALIBRATION, None)
    if dataset is not None:
        values.update(calibration_inputs(dataset))
    datasets = get_path(stored, EVALUATION, None)
    if datasets is not None:
        values.update(evaluation_inputs(datasets))
    return values


def field_of(path: tuple[str, ...]) -> str:
    """The input an error of this spec path is shown by ("" for the form as a whole)."""
    for size in range(len(path), 0, -1):
        if path[:size] in _FIELD_OF_PATH:
            return _FIELD_OF_PATH[path[:size]]
    return ""


def field_errors(errors: list[dict[str, Any]]) -> dict[str, list[str]]:
    """pydantic / SpecError entries -> {form field: [messages in plain words]}."""
    out: dict[str, list[str]] = {}
    for error in errors:
        out.setdefault(field_of(error_path(error)), []).append(plain_message(error))
    return out


def describe(error: dict[str, Any]) -> str:
    """One error as a line of text outside the form: its spec path, then its plain message."""
    path = ".".join(error_path(error))
    return f"{path}: {plain_message(error)}" if path else plain_message(error)
