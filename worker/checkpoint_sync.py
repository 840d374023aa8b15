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

import re

from sqlalchemy import select, update

from app import db
from app.job_files import JobFiles
from app.mirror import Guard, Mirror
from app.models import Job

STATE = "state.json"  # worker.engine.resume.STATE (not imported: that module loads torch)
# Every name the engine writes there (worker.engine.resume); nothing else is fetched or sent.
NAMES = re.compile(r"state\.json|(block|hidden)-[0-9]{5}\.safetensors")


def committed(state: dict) -> list[str]:
    """The files a committed ``state.json`` needs (worker.engine.resume's names). ValueError when it
    names something else (the mirror then copies nothing)."""
    named = [f"block-{int(i):05d}.safetensors" for i in state.get("blocks", [])]
    if state.get("hidden"):
        named.append(str(state["hidden"]))
    if not all(NAMES.fullmatch(name) for name in named):
        raise ValueError(f"state.json names a file outside the checkpoint's patterns: {named}")
    return named


def guard(settings, job_id: int) -> Guard:
    """The job's row keeps the sha256 of its mirrored checkpoint (jobs.checkpoint_files): the store
    is shared, the database is the trusted side."""

    def record(hashes: dict[str, str]) -> None:
        with db.session_scope(settings.database) as session:
            session.execute(update(Job).where(Job.id == job_id).values(checkpoint_files=hashes))

    def recorded() -> dict[str, str] | None:
        with db.session_scope(settings.database) as session:
            return session.scalar(select(Job.checkpoint_files).where(Job.id == job_id))

    return Guard(NAMES, record, recorded)


def for_job(settings, files: JobFiles) -> Mirror:
    mirror = files.store.mirror(
        files.resume,
        files.checkpoints,
        named=committed,
        state=STATE,
        interval_s=max(0.5, settings.heartbeat_interval_s),
    )
    guarded = getattr(mirror, "guarded", None)  # the local store's needs none: the directory is its own copy
    return guarded(guard(settings, files.job_id)) if guarded else mirror
