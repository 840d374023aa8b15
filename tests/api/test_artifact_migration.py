"""Migration 0005 (artifacts as rows) on SQLite and PostgreSQL: a database at 0004 holding a job
with an archive, one expired, and one that failed is upgraded; the archives get their hf-tar rows
(path, size, sha256, expiry carried over), the failed job none; the downgrade drops the table."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text

from app import db
from tests.support.pg import scratch_database


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
    else:
        with scratch_database("artifacts_migration") as url:
            yield url


JOB = (
    "INSERT INTO jobs (id, spec, model, method, sparsity, status, attempt, cancel_requested, created_at, "
    "finished_at, artifact_path, artifact_size, artifact_sha256, artifact_expired_at) VALUES "
    "(:id, '{}', 'm', 'sparsegpt', '0.5', :status, 1, false, :t, :t, :path, :size, :sha, :expired)"
)


def test_existing_archives_get_their_rows(database):
    command.upgrade(db.alembic_config(database), "0004")
    engine = create_engine(database)
    with engine.begin() as conn:
        t = "2026-01-02 03:04:05"
        conn.execute(
            text(JOB),
            dict(
                id=1,
                status="succeeded",
                t=t,
                path="/data/artifacts/1/attempt-1",
                size=10240,
                sha="a" * 64,
                expired=None,
            ),
        )
        conn.execute(
            text(JOB),
            dict(
                id=2,
                status="succeeded",
                t=t,
                path="s3://b/p/artifacts/2/sparsegpt-job-2.tar",
                size=20480,
                sha="b" * 64,
                expired=t,
            ),
        )
        conn.execute(text(JOB), dict(id=3, status="failed", t=t, path=None, size=None, sha=None, expired=None))
    engine.dispose()
    db.migrate(database)
    engine = create_engine(database)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT job_id, format, media_type, path, size, sha256, expired_at IS NOT NULL "
                "FROM artifacts ORDER BY job_id"
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        (1, "hf-tar", "application/x-tar", "/data/artifacts/1/attempt-1", 10240, "a" * 64, False),
        (2, "hf-tar", "application/x-tar", "s3://b/p/artifacts/2/sparsegpt-job-2.tar", 20480, "b" * 64, True),
    ]
    engine.dispose()
    db.dispose_all()
    command.downgrade(db.alembic_config(database), "0004")
    engine = create_engine(database)
    assert "artifacts" not in inspect(engine).get_table_names()
    assert "jobs" in inspect(engine).get_table_names()
    engine.dispose()
