"""The job row's compare-and-set transitions on a real database (SQLite and PostgreSQL), and the
task's handling of a redelivered message, run in-process through the real task code."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app import crud, db
from app.config import Settings
from app.models import utcnow


@pytest.fixture(scope="module")
def settings(service_env) -> Settings:
    env = service_env
    s = Settings(
        _env_file=None,
        data_dir=env["SPARSEGPT_DATA_DIR"],
        database_url=env["DATABASE_URL"],
        redis_url=env["REDIS_URL"],
        local_dirs=env["SPARSEGPT_LOCAL_DIRS"],
        max_attempts=2,
    )
    db.migrate(s.database)
    return s


def new_job(settings) -> int:
    with db.session_scope(settings.database) as session:
        return crud.create_job(session, spec={"model": "a/b", "method": "sparsegpt", "sparsity": "2:4"}).id


def claim(settings, job_id, *, worker="w1@host", pid=111, stale_s=60.0, dead=False):
    with db.session_scope(settings.database) as session:
        result = crud.claim_job(
            session,
            job_id=job_id,
            worker=worker,
            pid=pid,
            stale_before=crud.stale_before(stale_s),
            max_attempts=settings.max_attempts,
            owner_is_dead=lambda w, p: dead,
        )
        return (
            result.claimed,
            (result.job.status if result.job else None),
            (result.job.attempt if result.job else None),
            result.reason,
        )


def test_claim_once_then_redelivery_does_nothing(settings):
    job_id = new_job(settings)
    assert claim(settings, job_id)[:3] == (True, "running", 1)
    claimed, status, attempt, reason = claim(settings, job_id, worker="w2@host", pid=222)
    assert (claimed, status, attempt) == (False, "running", 1) and "running on w1@host" in reason


def test_dead_owner_or_stale_heartbeat_is_taken_over_until_the_limit(settings):
    job_id = new_job(settings)
    assert claim(settings, job_id)[:3] == (True, "running", 1)
    assert claim(settings, job_id, pid=222, dead=True)[:3] == (True, "running", 2)
    # Attempt 2 of 2 dies as well: the next delivery gives up with the reason.
    claimed, status, attempt, reason = claim(settings, job_id, pid=333, stale_s=-1)
    assert (claimed, status, attempt) == (False, "failed", 2) and "gave up after 2 attempt(s)" in reason
    with db.session_scope(settings.database) as session:
        assert crud.get_job(session, job_id).error == reason


def test_only_the_owning_attempt_finishes_or_beats(settings):
    job_id = new_job(settings)
    claim(settings, job_id)
    claim(settings, job_id, pid=222, stale_s=-1)  # a takeover: attempt 2 owns the job now
    with db.session_scope(settings.database) as session:
        assert crud.heartbeat(session, job_id=job_id, attempt=1) == (False, False)
        assert crud.heartbeat(session, job_id=job_id, attempt=2, progress={"stage": "pruning"}) == (True, False)
        assert not crud.finish_job(session, job_id=job_id, attempt=1, status="succeeded")
        assert crud.finish_job(
            session,
            job_id=job_id,
            attempt=2,
            status="succeeded",
            modules=[{"block": 0, "name": "q", "sparsity": 0.5, "error": 0.1, "seconds": 0.2}],
            metrics=[{"dataset": "wikitext2", "dense_perplexity": 10.0, "perplexity": 11.0}],
        )
    with db.session_scope(settings.database) as session:
        job = crud.get_job(session, job_id, details=True)
        assert job.status == "succeeded" and job.progress == {"stage": "pruning"}
        assert [m.name for m in job.modules] == ["q"] and job.metrics[0].perplexity == 11.0
        assert job.finished_at >= job.started_at and job.heartbeat_at.tzinfo is not None


def test_cancel_flag_reaches_the_heartbeat(settings):
    job_id = new_job(settings)
    claim(settings, job_id)
    with db.session_scope(settings.database) as session:
        assert crud.request_cancel(session, job_id=job_id).outcome == "requested"
    with db.session_scope(settings.database) as session:
        assert crud.heartbeat(session, job_id=job_id, attempt=1) == (True, True)


def test_redelivered_message_for_a_finished_job_runs_nothing(settings):
    """The real task code, in-process: a finished job is left exactly as it was."""
    from worker.tasks import JobRun

    job_id = new_job(settings)
    claim(settings, job_id)
    with db.session_scope(settings.database) as session:
        crud.finish_job(session, job_id=job_id, attempt=1, status="failed", error="boom")
    outcome = JobRun(settings, job_id, worker="w3@host").run()
    assert outcome == {"job": job_id, "skipped": "job is already failed"}
    with db.session_scope(settings.database) as session:
        job = crud.get_job(session, job_id)
        assert (job.status, job.attempt, job.error, job.worker) == ("failed", 1, "boom", "w1@host")


def test_failure_reasons_are_actionable(settings, monkeypatch):
    from worker.engine.errors import ModelNotFound
    from worker.failures import describe_failure

    monkeypatch.delenv("HF_TOKEN", raising=False)

    spec = {"model": "org/model", "calibration": {"nsamples": 128, "seqlen": 2048}}
    oom = describe_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), spec, settings)
    assert "nsamples 128 -> 64" in oom and "seqlen 2048 -> 1024" in oom
    missing = describe_failure(
        OSError("org/model is not a local folder and is not a valid model identifier"), spec, settings
    )
    assert "not found" in missing
    gated = describe_failure(ModelNotFound("org/model is gated: request access"), spec, settings)
    assert gated.startswith("org/model is gated") and "set HF_TOKEN for the workers" in gated
    assert describe_failure(ValueError("x"), spec, settings).startswith("internal error (ValueError")


def test_stale_before_is_in_the_past():
    assert crud.stale_before(30) < utcnow() - timedelta(seconds=29)
