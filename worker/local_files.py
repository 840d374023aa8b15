"""What a lost attempt left on this machine's disk, removed (issue 22, item 4).

A worker killed mid-job leaves its per-block checkpoints (``resume/``, about the size of the
model's blocks: 14 GB for an 8B model) and its unfinished output (``attempt-<n>.partial/``) in
``<data dir>/artifacts/<job>/``. When the job then finishes on another machine, nothing on this one
ever removes them. The worker does, when it starts and every ``INTERVAL_S`` after
(worker/celery_app.py), for the jobs the database says are not running: an ended or deleted job
loses both; a queued one its partial outputs (a new attempt writes its own), not its checkpoints
(an attempt here resumes from them). A running job's files are left alone, whichever worker runs
it (workers of one machine may share the data directory). Finished models (``attempt-<n>/``) stay:
the local store serves them. No torch here: the worker's main process runs it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sqlalchemy import select

from app import db
from app.job_files import JobFiles
from app.models import QUEUED, RUNNING, Job

log = logging.getLogger(__name__)
INTERVAL_S = 600.0


def remove_leftovers(settings) -> list[Path]:
    """Remove what jobs not running left on this machine; returns what was removed."""
    root = settings.artifacts_dir
    if not root.is_dir():
        return []
    ids = [int(entry.name) for entry in root.iterdir() if entry.is_dir() and entry.name.isdigit()]
    if not ids:
        return []
    with db.session_scope(settings.database) as session:
        status = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(ids))).all())
    removed: list[Path] = []
    for job_id in ids:
        state = status.get(job_id)  # None: the job was deleted
        if state == RUNNING:
            continue
        files = JobFiles(settings, job_id)
        doomed = sorted(files.dir.glob("attempt-*.partial"))
        if state != QUEUED:
            doomed.append(files.resume)
        for path in doomed:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    if removed:
        log.warning(
            "removed %d leftovers of attempts lost on this machine: %s",
            len(removed),
            ", ".join(str(p.relative_to(root)) for p in removed),
        )
    return removed
