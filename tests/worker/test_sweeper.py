"""The sweeper's rules on PostgreSQL and a Redis of its own, several sweepers at once; the free-disk
check through the real task code. (tests/team/test_crash.py has the same with real workers.)"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import redis

from app import crud, db
from app.models import Job, utcnow
from app.sweeper import broker_messages, sweep_once
from tests.support.stacks import InProcess, make_inprocess


@pytest.fixture(scope="module")
def env(team_pg, module_redis, models_dir, tmp_path_factory):
    client, settings, tokens = make_inprocess(
        team_pg, module_redis, models_dir, tmp_path_factory, max_active_jobs_per_user=0
    )
    with client:
        yield InProcess(client, settings, tokens)


def queued_job(env) -> int:
    response = env.client.post(
        "/api/v1/jobs", json={"model": "facebook/opt-125m", "sparsity": 0.5}, headers=env.as_("alice")
    )
    assert response.status_code == 201
    return response.json()["id"]


def claimed(env, job_id, *, beat_age_s: float) -> None:
    with db.session_scope(env.settings.database) as session:
        assert crud.claim_job(
            session,
            job_id=job_id,
            worker="gone@elsewhere",
            pid=4242,
            stale_before=crud.stale_before(60),
            max_attempts=env.settings.max_attempts,
        ).claimed
        session.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=beat_age_s)


def row(env, job_id):
    with db.session_scope(env.settings.database) as session:
        return crud.get_job(session, job_id)


def messages_for(env, job_id) -> int:
    text = broker_messages(env.client.app.state.redis, env.settings.queue)
    return text.count(f'"argsrepr": "[{job_id}]"')


def sweep_concurrently(env, n: int = 4):
    reports, errors = [], []

    def one():
        try:
            reports.append(sweep_once(env.settings, env.client.app.state.sessions, env.client.app.state.redis))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return reports


def test_expired_heartbeat_is_requeued_once_then_failed_past_the_limit(env):
    job_id = queued_job(env)
    claimed(env, job_id, beat_age_s=env.settings.heartbeat_timeout_s + 5)
    before = messages_for(env, job_id)
    reports = sweep_concurrently(env)
    assert sum(job_id in r.requeued for r in reports) == 1, "four sweepers, one requeue"
    job = row(env, job_id)
    assert job.status == "queued" and job.attempt == 1 and "stopped sending heartbeats" in job.error
    assert messages_for(env, job_id) == before + 1, "exactly one new run message"
    assert job.celery_task_id in broker_messages(env.client.app.state.redis, env.settings.queue)
    # Attempt 2 (the limit) vanishes as well: failed with the reason, no new message.
    claimed(env, job_id, beat_age_s=env.settings.heartbeat_timeout_s + 5)
    assert row(env, job_id).attempt == 2
    reports = sweep_concurrently(env)
    assert sum(job_id in r.failed for r in reports) == 1
    job = row(env, job_id)
    assert job.status == "failed" and "gave up after 2 attempt(s)" in job.error and "attempt limit is 2" in job.error
    assert messages_for(env, job_id) == before + 1


def test_live_heartbeat_is_left_alone(env):
    job_id = queued_job(env)
    claimed(env, job_id, beat_age_s=0)
    sweep_concurrently(env, 2)
    assert row(env, job_id).status == "running"
    with db.session_scope(env.settings.database) as session:
        crud.finish_job(session, job_id=job_id, attempt=1, status="failed", error="test over")


def test_stale_job_with_a_cancel_request_ends_cancelled(env):
    job_id = queued_job(env)
    claimed(env, job_id, beat_age_s=env.settings.heartbeat_timeout_s + 5)
    with db.session_scope(env.settings.database) as session:
        crud.request_cancel(session, job_id=job_id)
    sweep_concurrently(env, 2)
    assert row(env, job_id).status == "cancelled"


def test_lost_message_is_sent_again_once(env):
    r: redis.Redis = env.client.app.state.redis
    job_id = queued_job(env)
    task_id = row(env, job_id).celery_task_id
    assert task_id in broker_messages(r, env.settings.queue)
    sweep_concurrently(env, 3)
    assert row(env, job_id).celery_task_id == task_id, "a message still queued is not sent again"
    r.delete(env.settings.queue)  # what a Redis restart without persistence does
    assert messages_for(env, job_id) == 0
    reports = sweep_concurrently(env, 3)
    assert sum(job_id in rep.resent for rep in reports) == 1
    assert messages_for(env, job_id) == 1
    assert row(env, job_id).celery_task_id != task_id and row(env, job_id).status == "queued"


def test_free_disk_check_fails_the_job_with_the_reason(env):
    """The real task code: the data dir has less free space than the setting."""
    from worker.tasks import JobRun

    job_id = queued_job(env)
    settings = env.settings.model_copy(update={"min_free_disk_mb": 10**9})  # a petabyte
    outcome = JobRun(settings, job_id, worker="t@h").run()
    assert outcome["status"] == "failed"
    job = row(env, job_id)
    assert job.status == "failed" and job.attempt == 1
    assert "not started" in job.error and "GiB free" in job.error and "SPARSEGPT_MIN_FREE_DISK_MB" in job.error
    assert not (settings.artifacts_dir / str(job_id)).exists() or not any(
        (settings.artifacts_dir / str(job_id)).iterdir()
    )


def test_sign_ins_that_admit_nobody_are_purged(env):
    """Expired and revoked dashboard sessions are deleted by the sweeper; a live one stays."""
    from app.models import User, WebSession

    now = utcnow()
    with db.session_scope(env.settings.database) as session:
        user_id = session.query(User).filter(User.name == "alice").one().id
        for key, expires, revoked in (
            ("live", now + timedelta(hours=1), None),
            ("expired", now - timedelta(seconds=1), None),
            ("revoked", now + timedelta(hours=1), now),
        ):
            crud.create_web_session(session, key=f"{key}-{'0' * 50}"[:64], user_id=user_id, expires_at=expires)
            if revoked:
                crud.revoke_web_session(session, f"{key}-{'0' * 50}"[:64])
    report = sweep_once(env.settings, env.client.app.state.sessions, env.client.app.state.redis)
    assert report.sessions_purged >= 2
    with db.session_scope(env.settings.database) as session:
        left = {row.id.split("-")[0] for row in session.query(WebSession).filter(WebSession.user_id == user_id)}
    assert "live" in left and not {"expired", "revoked"} & left
