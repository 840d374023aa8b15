"""What the artifact says about its job, in names its user recognises.

The engine writes its report and model card with the paths it ran on: the attempt's
``.partial`` output directory, an upload's storage path, a model's resolved real path. Before
the archive is hashed, the worker rewrites both files with the names the user gave (``upload:3``,
the model path as submitted, the archive's own name); the timings are the engine's. No torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.engine.card import model_card
from worker.job_inputs import JobInputs

REPORT = "sparsegpt_report.json"
CARD = "README.md"


def relabel(value: Any, names: dict[str, str]) -> Any:
    """``value`` with every string (and dict key) that is one of ``names`` replaced by its name."""
    if isinstance(value, str):
        return names.get(value, value)
    if isinstance(value, dict):
        return {relabel(k, names): relabel(v, names) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relabel(v, names) for v in value]
    return value


def public_report(report: dict[str, Any], inputs: JobInputs, stored: dict[str, Any], name: str) -> dict[str, Any]:
    names = dict(inputs.labels)
    if inputs.spec.model != stored.get("model"):
        names[inputs.spec.model] = str(stored.get("model"))
    public = relabel(report, names)
    public["output"] = name
    if isinstance(public.get("run"), dict):
        public["run"]["output"] = name
    return public


def rewrite(directory: Path, report: dict[str, Any], inputs: JobInputs, stored: dict[str, Any], name: str) -> dict:
    """Rewrite the report and the card in the saved model ``directory``; returns the public report."""
    public = public_report(report, inputs, stored, name)
    (directory / REPORT).write_text(json.dumps(public, indent=2), encoding="utf-8")
    (directory / CARD).write_text(model_card(public), encoding="utf-8")
    return public
