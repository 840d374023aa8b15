"""What a claimed job runs on, as this server allows it, checked again just before it starts.

The job row stores the spec the API accepted (``worker.engine.contract.spec.JobSpec`` as a dict; one
written by an older version validates too, missing sections take their defaults). Here it is
validated, refused when it asks for what the server disallows (trust_remote_code, a path that
left the allowed directories since it was queued, an upload that vanished, too little free
disk, a Hub id that names something in the working directory), and its references resolved for the
engine: a local model path to its real path,
``upload:<id>`` to the stored file, a dataset path re-resolved under the allowed directories.
The engine gets the result unchanged. No torch here.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app import crud, db, storage
from app.config import Settings
from app.model_links import escaped_file
from app.paths import PathNotAllowed, resolve_allowed
from worker.engine.contract.spec import JobSpec
from worker.engine.contract.spec_fields import first_error
from worker.engine.contract.spec_sections import BUILTIN_DATASETS, upload_id


class Refused(Exception):
    """The job cannot run as stored (a path left the allowed directories, an upload vanished)."""


@dataclass(frozen=True)
class JobInputs:
    spec: JobSpec  # what the engine runs: datasets are built-in names or file paths
    # a resolved dataset path -> the name the user gave (upload:3, a path): the engine reports it so
    # (worker.published.labels, RunOptions.labels)
    labels: dict[str, str]


def job_inputs(stored: dict[str, Any], settings: Settings) -> JobInputs:
    """The stored spec checked and resolved; raises ``Refused`` with a reason a person can act on."""
    check_free_disk(settings)
    spec = _validated(JobSpec.model_validate, stored)
    if spec.trust_remote_code and not settings.allow_trust_remote_code:
        raise Refused("trust_remote_code is refused by this server's settings")
    if spec.model.startswith("/"):
        spec = spec.model_copy(update={"model": _allowed(spec.model, settings, kind="dir")})
        escaped = escaped_file(Path(spec.model), settings.allowed_dirs)  # each file, not the directory only
        if escaped:
            raise Refused(escaped)
    else:
        check_hub_id(spec.model)
    labels: dict[str, str] = {}
    spec = _validated(spec.with_datasets, lambda name: _dataset(name, settings, labels))
    return JobInputs(spec, labels)


def check_hub_id(model: str) -> None:
    """A Hub id is never read from the disk. transformers looks for a directory named like the
    id relative to the working directory first; the worker works in an empty one of its own
    (``worker.celery_app``), and refuses the job when that is not so rather than load it."""
    if os.path.lexists(model):
        raise Refused(
            f"model {model!r} is a Hub id, yet the worker's working directory ({os.getcwd()}) holds an entry "
            "of that name; a Hub id is never loaded from the disk (a local model is named by its absolute "
            "path under SPARSEGPT_LOCAL_DIRS): start the worker with `sparsegpt worker`, which works in "
            "<data_dir>/worker-cwd"
        )


def _validated(make, arg) -> JobSpec:
    try:
        return make(arg)
    except ValidationError as err:  # written by an incompatible version, or resolved onto a repeat
        path, message = first_error(err)
        raise Refused(f"the stored job spec is not valid here: {'.'.join(path) or 'spec'}: {message}") from None


def _allowed(value: str, settings: Settings, *, kind: str) -> str:
    try:  # resolved again: a symlink may have changed since the job was queued
        return str(resolve_allowed(value, settings.allowed_dirs, kind=kind))
    except PathNotAllowed as err:
        raise Refused(str(err)) from None


def _dataset(value: str, settings: Settings, labels: dict[str, str]) -> str:
    """A built-in name as it is; ``upload:<id>`` to its stored file; a path re-checked."""
    if value in BUILTIN_DATASETS:
        return value
    set_id = upload_id(value)
    if set_id is not None:
        with db.session_scope(settings.database) as session:
            row = crud.get_calibration_set(session, set_id)
            path = row.path if row is not None else None
            sha = row.sha256 if row is not None else None
        if path is not None:  # a file on this machine (from a remote store: its cached copy)
            try:
                path = str(storage.get_store(settings).local_file(path, sha))
            except storage.StorageError as err:
                raise Refused(f"calibration set {value} could not be fetched from the store: {err}") from None
        if path is None or not Path(path).is_file():
            raise Refused(f"calibration set {value} no longer exists on the server; upload it again")
    else:
        path = _allowed(value, settings, kind="file")
    labels[path] = value
    return path


def check_free_disk(settings: Settings) -> None:
    """Refuse to start when the data directory's disk has less free space than the setting."""
    minimum = settings.min_free_disk_mb * 1024 * 1024
    if minimum <= 0:
        return
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.data_dir).free
    if free < minimum:
        raise Refused(
            f"not started: the server's data directory ({settings.data_dir}) has {free / 2**30:.2f} GiB free, "
            f"below the {minimum / 2**30:.2f} GiB minimum (SPARSEGPT_MIN_FREE_DISK_MB); "
            "delete old jobs' artifacts (DELETE /api/v1/jobs/{id}) or ask an admin to free space, then retry"
        )
