"""Heartbeats are stamped and compared with the database's clock (issue 22, item 5), on SQLite
and PostgreSQL. A worker whose clock was 60 s behind the sweeper's had every job requeued: the
process's own clock (``app.models.utcnow``) is made wrong here, in both directions, and neither
the stamp nor the sweeper's comparison moves."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import redis
from sqlalchemy import func, select

from app import crud, db
from app.config import Settings
from app.crud import lifecycle
from app.models import Job
from app.sweeper import sweep_once
from tests.support.pg import scratch_database


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path, redis_available):
    def make(url: str) -> Settings:
        s = Settings(
            _env_file=None,
            data_dir=str(tmp_path),
            database_url=url,
            redis_url="redis://127.0.0.1:6379/13",
            heartbeat_timeout_s=30,
            max_attempts=3,
            sweep_interval_s=0,
        )
        db.migrate(s.database)
        return s

    if request.param == "sqlite":
        yield make(f"sqlite:///{tmp_path / 'clock.db'}")
    else:
        with scratch_database("clock") as url:
            yield make(url)


def server_clock(session) -> datetime:
    """The database's clock read directly (not through the code under test)."""
    if session.get_bind().dialect.name == "sqlite":
        return datetime.fromisoformat(session.scalar(select(func.datetime("now")))).replace(tzinfo=timezone.utc)
    return session.scalar(select(func.now()))


def skew(monkeypatch, seconds: float) -> None:
    """This process's clock, as the crud layer reads it, off by ``seconds``."""
    wrong = lambda: datetime.now(timezone.utc) + timedelta(seconds=seconds)  # noqa: E731
    monkeypatch.setattr(lifecycle, "utcnow", wrong)


def running_job(settings, *, behind_s: float, monkeypatch) -> int:
    """A job claimed and beaten by a 'worker' whose clock is ``behind_s`` seconds behind."""
    skew(monkeypatch, -behind_s)
    with db.session_scope(settings.database) as session:
        job_id = crud.create_job(session, spec={"model": "a/b", "method": "sparsegpt", "sparsity": "2:4"}).id
    with db.session_scope(settings.database) as session:
        claim = crud.claim_job(
            session,
            job_id=job_id,
            worker="slow@host",
            pid=1,
            stale_before=crud.stale_before(30, session),
            max_attempts=3,
        )
        assert claim.claimed
    with db.session_scope(settings.database) as session:
        assert crud.heartbeat(session, job_id=job_id, attempt=1) == (True, False)
    return job_id


def test_a_heartbeat_is_stamped_with_the_database_clock(settings, monkeypatch):
    job_id = running_job(settings, behind_s=60, monkeypatch=monkeypatch)
    with db.session_scope(settings.database) as session:
        stamped = session.get(Job, job_id).heartbeat_at
        assert abs((stamped - server_clock(session)).total_seconds()) < 5


def test_the_sweeper_compares_with_the_database_clock(settings, monkeypatch):
    job_id = running_job(settings, behind_s=60, monkeypatch=monkeypatch)
    skew(monkeypatch, +60)  # the sweeper's machine runs ahead as well: 120 s between the two
    sent = []
    report = sweep_once(
        settings,
        db.session_factory(settings.database),
        redis.Redis.from_url(settings.redis_url),
        send=lambda *a, **k: sent.append(a),
    )
    assert report.requeued == [] and sent == []
    with db.session_scope(settings.database) as session:
        assert session.get(Job, job_id).status == "running"
        session.execute(
            Job.__table__.update()
            .where(Job.id == job_id)
            .values(heartbeat_at=server_clock(session) - timedelta(seconds=31))
        )
    report = sweep_once(
        settings,
        db.session_factory(settings.database),
        redis.Redis.from_url(settings.redis_url),
        send=lambda *a, **k: sent.append(a),
    )
    assert report.requeued == [job_id]  # a really stale heartbeat is still found


def test_db_now_is_the_servers_clock(settings, monkeypatch):
    skew(monkeypatch, -3600)
    with db.session_scope(settings.database) as session:
        assert abs((lifecycle.db_now(session) - server_clock(session)).total_seconds()) < 2
        assert abs((crud.stale_before(30, session) - server_clock(session)).total_seconds() - (-30)) < 2
