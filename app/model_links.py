"""Every file of a local model directory resolved under the allowed directories (issue 22, item 1).

Only the directory a job names was checked once: a ``chat_template.jinja -> /proc/self/environ``
inside it put the worker's environment into an artifact, a ``model.safetensors`` link published a
model from elsewhere. The loader reads any of the directory's files (weights, config, tokenizer
files, templates, GGUF), so each must resolve under an allowed directory. Used at submit
(app/services/specs.py) and on the worker just before the job starts (worker/job_inputs.py); the
engine repeats the check in ``worker.engine.checkpoint.load_model(allowed_roots=...)``.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_ENTRIES = 100_000  # a directory this large is no model; walking it would hold the request


def escaped_file(directory: Path, allowed: list[Path]) -> str | None:
    """A problem naming the first entry under ``directory`` (links followed, each real directory
    once) whose real path is outside every ``allowed`` directory; None when all stay inside."""
    roots = [Path(root).resolve() for root in allowed]
    seen: set[Path] = set()
    count = 0
    for current, dirs, files in os.walk(directory, followlinks=True):
        real_dir = Path(current).resolve()
        if real_dir in seen:  # a link loop or a second link to the same directory
            dirs[:] = []
            continue
        seen.add(real_dir)
        for name in (*dirs, *files):
            count += 1
            if count > MAX_ENTRIES:
                return f"model directory {directory.name!r} holds more than {MAX_ENTRIES} entries"
            entry = Path(current) / name
            try:
                real = entry.resolve(strict=True)
            except (OSError, RuntimeError):  # a dangling link or a loop: nothing the loader may read
                real = None
            if real is None or not any(real == root or real.is_relative_to(root) for root in roots):
                shown = entry.relative_to(directory)
                return (
                    f"model directory {directory.name!r}: {str(shown)!r} is a link that does not resolve "
                    "inside the server's allowed directories (every file of a local model must be inside them)"
                )
    return None
