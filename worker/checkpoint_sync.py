"""The engine's per-block checkpoints followed into the job's store, so a job whose machine was
lost resumes on another one where it stopped.

The engine writes them to the job's ``resume`` directory (app/job_files.py) on the worker
running it; ``state.json`` is the commit point and names the files it needs. The store's
``mirror`` (app/mirror.py) copies each commit to ``checkpoints/<job>/`` every heartbeat interval
and fetches the store's when an attempt starts with none; the engine then takes it up if its
fingerprint matches, or starts over. In the local store the directory already is its copy (the
mirror does nothing). The job's end deletes them (``JobFiles.drop_checkpoints``).
No torch here: the worker's main process imports this module.
"""

from __future__ import annotations

from app.job_files import JobFiles
from app.mirror import Mirror

STATE = "state.json"  # worker.engine.resume.STATE (not imported: that module loads torch)


def committed(state: dict) -> list[str]:
    """The files a committed ``state.json`` needs (worker.engine.resume's names)."""
    named = [f"block-{int(i):05d}.safetensors" for i in state.get("blocks", [])]
    if state.get("hidden"):
        named.append(str(state["hidden"]))
    return named


def for_job(settings, files: JobFiles) -> Mirror:
    return files.store.mirror(files.resume, files.checkpoints, named=committed, state=STATE,
                              interval_s=max(0.5, settings.heartbeat_interval_s))
