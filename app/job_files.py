"""Every path and key of one job, and its cleanup: the one place that knows where a job's files are.

On the machine running it, under ``<data dir>/artifacts/<job>/``:

- ``attempt-<n>.partial/``: the engine's output while attempt n runs (removed when it ends)
- ``attempt-<n>/``: a finished attempt's saved model directory (the local store serves it); a job
  that quantizes has one directory per format in it (``compressed-tensors/``, ``dense/``: each
  packager's ``source``)
- ``resume/``: the engine's per-block checkpoints (``checkpoints/<job>/`` in the store follows it)

In the store (app/storage.py): ``artifacts/<job>/<file of each format>`` and the report beside
them, ``checkpoints/<job>/``. Uploads are the store's ``uploads/<sha256>.<format>``
(app/services/uploads.py). Cleanup is one set of methods for every caller (the worker, the
sweeper, DELETE): ``remove_partials`` when a job ended without its attempt's ``finally``,
``drop_checkpoints`` when it ended, ``delete_artifacts`` at expiry, ``delete_all`` at DELETE.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from app import archive, packagers
from app.storage import StorageError, Store, get_store

log = logging.getLogger(__name__)
REPORT = "sparsegpt_report.json"  # worker.published.REPORT: the engine's report in the saved directory
RESUME_DIR = "resume"


class _Report(packagers.Packager):
    """The saved directory's report as a file of its own (not a format: it is in every package)."""

    media_type = "application/json"

    def __init__(self, directory: Path):
        self.path = directory / REPORT  # the saved directory's, or its default format's (one per format)

    def stream(self, model_dir: Path, prefix: str):
        yield self.path.read_bytes()


class JobFiles:
    def __init__(self, settings, job_id: int, store: Store | None = None):
        self.job_id = int(job_id)  # a number: a path below is never named by input
        self.dir: Path = settings.artifacts_dir / str(self.job_id)
        self.store = store if store is not None else get_store(settings)

    # --- names -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The archive's top directory and the download's file name stem."""
        return archive.artifact_name(self.job_id)

    def attempt(self, n: int) -> Path:
        return self.dir / f"attempt-{int(n)}"

    def partial(self, n: int) -> Path:
        return self.dir / f"attempt-{int(n)}.partial"

    @property
    def resume(self) -> Path:
        return self.dir / RESUME_DIR

    @property
    def checkpoints(self) -> str:
        return f"checkpoints/{self.job_id}"

    @property
    def artifacts(self) -> str:
        return f"artifacts/{self.job_id}"

    def artifact_key(self, packager: packagers.Packager) -> str:
        return f"{self.artifacts}/{packager.file_name(self.name)}"

    # --- publish -------------------------------------------------------------------------------

    def publish(self, final: Path, formats: list[packagers.Packager]) -> list[dict[str, Any]]:
        """The finished directory in each format, kept by the store, its report beside them:
        rows for ``crud.finish_job(artifacts=...)``, the default format first. StorageError
        when the store refuses (what was kept of this job's artifacts is removed again)."""
        rows: list[dict[str, Any]] = []
        try:
            report = _Report(formats[0].source(final) if formats else final)  # a quantizing job: its default's
            if report.path.is_file():  # beside the packages (the local store serves it from the directory)
                self.store.publish(f"{self.artifacts}/{REPORT}", final, report, self.name)
            for packager in formats:
                path, size, sha = self.store.publish(self.artifact_key(packager), final, packager, self.name)
                rows.append(
                    dict(format=packager.format, media_type=packager.media_type, path=path, size=size, sha256=sha)
                )
        except BaseException:
            self.discard(rows)
            raise
        return rows

    def discard(self, rows: list[dict[str, Any]]) -> None:
        """Artifacts published for an attempt that no longer owns the job."""
        for row in rows:
            try:
                self.store.delete(row["path"])
            except StorageError as err:
                log.warning("job %s: %s", self.job_id, err)

    def keep_only(self, rows: list[dict[str, Any]]) -> None:
        """After a success: every attempt directory the artifacts do not live in goes (earlier
        attempts' leftovers; this one's too once a remote store holds its packages), and the
        checkpoints (no attempt resumes)."""
        kept = {str(Path(row["path"])) for row in rows}
        for entry in self.dir.glob("attempt-*"):
            if str(entry) not in kept:
                shutil.rmtree(entry, ignore_errors=True)
        self.drop_checkpoints()

    # --- cleanup -------------------------------------------------------------------------------

    def drop_checkpoints(self) -> None:
        """The job ended: its per-block checkpoints go, here and in the store."""
        shutil.rmtree(self.resume, ignore_errors=True)
        try:
            self.store.delete_prefix(self.checkpoints)
        except StorageError as err:
            log.warning("job %s: %s", self.job_id, err)

    def remove_partials(self) -> None:
        """Unfinished outputs of attempts whose process was killed (no ``finally`` ran for them),
        and the checkpoints: called once the job has ended. The directory goes if nothing is left."""
        for partial in self.dir.glob("attempt-*.partial"):
            shutil.rmtree(partial, ignore_errors=True)
        self.drop_checkpoints()
        try:
            self.dir.rmdir()  # only if nothing else is there
        except OSError:
            pass

    def delete_artifacts(self) -> None:
        """Every file of the job on this machine and its artifacts in the store (StorageError:
        the store's part failed; this machine's is gone)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.store.delete_prefix(self.artifacts)

    def delete_all(self) -> None:
        """DELETE: everything of the job, here and in the store (a failing store is logged)."""
        try:
            self.delete_artifacts()
        except StorageError as err:
            log.warning("job %s: %s", self.job_id, err)
        self.drop_checkpoints()
