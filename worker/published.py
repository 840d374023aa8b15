"""What the artifact says about its job, in names its user recognises.

The engine runs on the server's paths: the attempt's ``.partial`` output directory, an upload's
storage path, a model's resolved real path, the server's task directories. ``labels`` gives it the
name the user knows for each (``upload:3``, the model path as submitted, the archive's own name),
so the engine writes its report and model card once, with those names (``RunOptions.labels``).
No torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.job_inputs import JobInputs

REPORT = "sparsegpt_report.json"
CARD = "README.md"


def labels(
    inputs: JobInputs, stored: dict[str, Any], *, output: Path, name: str, task_dirs: tuple[str, ...] = ()
) -> dict[str, str]:
    """Path the engine runs on -> the name its report and card give it."""
    names = dict(inputs.labels)  # the datasets: upload:3, the path as given
    if inputs.spec.model != stored.get("model"):  # the model's resolved path -> as the user gave it
        names[inputs.spec.model] = str(stored.get("model"))
    names[str(output)] = name
    for directory in task_dirs:  # the server's lm-eval task directories: their own names only
        names.setdefault(str(directory), Path(directory).name)
    return names
