"""The per-process memories that keep requests cheap (issue 22, an API that keeps up): whom a
credential names (app/auth_cache.py) and /health's checks (app/api/health.py); and the jobs list
read as plain rows says what each job's own page says."""

from __future__ import annotations

import time
import uuid

from fastapi.testclient import TestClient

from app import auth_cache
from app.config import Settings
from app.main import create_app


def test_a_credential_is_remembered_briefly_and_a_refusal_never():
    calls = []

    def look_up(answer):
        def run():
            calls.append(answer)
            return answer

        return run

    key = uuid.uuid4().hex
    assert auth_cache.remembered("db", "token", key, look_up(None)) is None
    assert auth_cache.remembered("db", "token", key, look_up("alice")) == "alice"  # a refusal was not kept
    assert auth_cache.remembered("db", "token", key, look_up("bob")) == "alice"  # remembered within the TTL
    assert calls == [None, "alice"]
    time.sleep(auth_cache.TTL_S + 0.05)
    assert auth_cache.remembered("db", "token", key, look_up("bob")) == "bob"  # looked up again after it
    assert auth_cache.remembered("other-db", "token", key, look_up("carol")) == "carol"  # per database
    auth_cache.forget_all()  # a logout in this process
    assert auth_cache.remembered("db", "token", key, look_up("dave")) == "dave"


def test_health_never_reuses_a_failure(tmp_path, redis_server):
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        redis_url=redis_server.url,
        auth="off",
        sweep_interval_s=0,
        queue=f"idle-{uuid.uuid4().hex[:6]}",
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/api/v1/health").status_code == 200
        redis_server.kill()
        time.sleep(1.1)  # past the reuse of the healthy answer
        assert client.get("/api/v1/health").status_code == 503
        redis_server.start()
        assert client.get("/api/v1/health").status_code == 200  # at once: the failure was not kept


def test_the_jobs_list_items_match_each_jobs_own_view(tmp_path, redis_available, models_dir):
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        redis_url="redis://127.0.0.1:6379/11",
        auth="off",
        local_dirs=str(models_dir),
        queue=f"idle-{uuid.uuid4().hex[:6]}",
        sweep_interval_s=0,
        max_active_jobs_per_user=0,
    )
    with TestClient(create_app(settings)) as client:
        for sparsity in ("2:4", 0.5, "4:8"):
            body = {
                "model": str(models_dir / "llama"),
                "sparsity": sparsity,
                "calibration": {"dataset": str(models_dir / "calib.txt"), "nsamples": 4, "seqlen": 32},
                "evaluation": {"datasets": []},
            }
            assert client.post("/api/v1/jobs", json=body).status_code == 201
        items = client.get("/api/v1/jobs").json()["items"]
        assert len(items) == 3
        for item in items:
            whole = client.get(f"/api/v1/jobs/{item['id']}").json()
            assert {k: whole[k] for k in item if k in whole} == {k: v for k, v in item.items() if k in whole}
