"""A worker's clock skew on the Workers page, and its last heartbeat measured with one clock
(Redis TIME on both sides; issue 22, item 5): a worker 60 s behind is seen now, shown 60 s behind."""

from __future__ import annotations

import json
import secrets
import time

import pytest
import redis
from fastapi.testclient import TestClient

from app import streams
from app.config import Settings
from app.main import create_app
from app.workers import live_workers
from worker import celery_app


@pytest.fixture()
def client(tmp_path, redis_available):
    settings = Settings(
        _env_file=None,
        data_dir=str(tmp_path),
        database_url=f"sqlite:///{tmp_path}/db.sqlite",
        redis_url="redis://127.0.0.1:6379/12",
        auth="off",
        sweep_interval_s=0,
        queue=f"idle-{secrets.token_hex(3)}",
    )
    r = redis.Redis.from_url(settings.redis_url)
    for key in r.scan_iter(match=streams.WORKER_PATTERN):
        r.delete(key)
    with TestClient(create_app(settings)) as test_client:
        test_client.r = r
        yield test_client


def register(r, monkeypatch, name: str, offset_s: float) -> dict:
    """What a worker whose clock is ``offset_s`` off writes (worker.celery_app.registration_record)."""
    real = time.time
    monkeypatch.setattr(celery_app.time, "time", lambda: real() + offset_s)
    record = celery_app.registration_record(r, {"name": name, "queues": ["q"], "pid": 7})
    monkeypatch.setattr(celery_app.time, "time", real)
    r.set(streams.worker_key(name), json.dumps(record), ex=30)
    return record


def test_a_skewed_worker_is_seen_now_and_its_skew_recorded(client, monkeypatch):
    record = register(client.r, monkeypatch, "slow@host", -60)
    assert -61 < record["clock_skew_s"] < -59
    seconds, micros = client.r.time()
    assert abs(record["seen"] - (seconds + micros / 1e6)) < 2  # stamped with Redis's clock, not its own
    (found,) = live_workers(client.r)
    assert found["seen_s_ago"] < 2


def test_the_workers_page_and_api_show_the_skew(client, monkeypatch):
    register(client.r, monkeypatch, "slow@host", -60)
    register(client.r, monkeypatch, "fast@host", 90)
    register(client.r, monkeypatch, "ok@host", 0)
    html = client.get("/workers").text
    assert "60 s behind" in html and "90 s ahead" in html and "in step" in html
    items = {w["name"]: w for w in client.get("/api/v1/workers").json()["items"]}
    assert round(items["slow@host"]["clock_skew_s"]) == -60 and items["slow@host"]["seen_s_ago"] < 2
