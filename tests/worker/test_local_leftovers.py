"""A lost attempt's checkpoints and partial output leave this machine's disk once the database
says the job does not run (issue 22, item 4); running jobs' files and finished models stay."""

from __future__ import annotations

import pytest

from app import db
from app.config import Settings
from app.job_files import JobFiles
from app.models import Job
from worker.local_files import remove_leftovers


@pytest.fixture
def settings(tmp_path) -> Settings:
    s = Settings(_env_file=None, data_dir=str(tmp_path / "data"), database_url=f"sqlite:///{tmp_path}/db.sqlite")
    db.migrate(s.database)
    return s


def job(settings, status: str) -> int:
    with db.session_scope(settings.database) as session:
        row = Job(
            spec={"model": "a/b"},
            model="a/b",
            method="sparsegpt",
            sparsity="2:4",
            status=status,
            worker="other@machine",
        )
        session.add(row)
        session.flush()
        return row.id


def leave(settings, job_id: int) -> JobFiles:
    """What a killed attempt 1 leaves, and a finished attempt's model directory."""
    files = JobFiles(settings, job_id)
    for path in (files.resume, files.partial(1), files.attempt(2)):
        path.mkdir(parents=True)
        (path / "block-00000.safetensors").write_bytes(b"x" * 1000)
    return files


def test_ended_deleted_and_queued_jobs_lose_their_leftovers_running_ones_keep_them(settings):
    ended = {status: leave(settings, job(settings, status)) for status in ("succeeded", "failed", "cancelled")}
    queued = leave(settings, job(settings, "queued"))
    running = leave(settings, job(settings, "running"))
    deleted = leave(settings, 999)  # no row: DELETE ran while this machine was away
    removed = remove_leftovers(settings)
    for files in (*ended.values(), deleted):
        assert not files.resume.exists() and not files.partial(1).exists()
        assert (files.attempt(2) / "block-00000.safetensors").exists()  # a finished model: served from here
    assert queued.resume.exists() and not queued.partial(1).exists()  # an attempt here resumes from it
    assert running.resume.exists() and running.partial(1).exists()
    assert len(removed) == 2 * 4 + 1
    assert remove_leftovers(settings) == []


def test_nothing_there_is_nothing_to_do(settings):
    assert remove_leftovers(settings) == []
    settings.artifacts_dir.mkdir(parents=True)
    (settings.artifacts_dir / "not-a-job").mkdir()
    assert remove_leftovers(settings) == [] and (settings.artifacts_dir / "not-a-job").exists()
