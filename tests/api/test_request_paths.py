"""The cheap paths a request takes (issue 22, an API that keeps up) say what the full ones said:
the jobs list read on a Core connection and serialized once (pages, filters, totals past the
end, on SQLite and PostgreSQL), a remembered credential decided at the edge (and a refused or
unknown one still refused there), and /health's public and signed-in answers."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from app import auth_cache, crud, db
from app.config import Settings
from app.main import create_app
from app.models import FAILED, SUCCEEDED
from app.schemas import HealthOut, JobList
from app.tokens import hash_token, new_token
from tests.support.pg import scratch_database

SPEC = {"model": "/models/llama", "method": "sparsegpt", "sparsity": 0.5}


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'listing.db'}"
    else:
        with scratch_database("sparsegpt_listing") as url:
            yield url


def _settings(tmp_path, database: str, auth: str) -> Settings:
    return Settings(
        _env_file=None,
        data_dir=tmp_path,
        database_url=database,
        redis_url="redis://127.0.0.1:6379/11",
        auth=auth,
        sweep_interval_s=0,
        queue=f"idle-{uuid.uuid4().hex[:6]}",
    )


def _seed(database: str) -> tuple[str, list[int]]:
    """Seven jobs of two owners, three of them succeeded and one failed; an admin's token."""
    db.migrate(database)
    token = new_token()
    ids = []
    with db.session_scope(database) as session:
        admin = crud.create_user(session, name="ada", token_hash=hash_token(token), is_admin=True)
        other = crud.create_user(session, name="bo", token_hash=hash_token(new_token()))
        for i in range(7):
            job = crud.create_job(session, spec=SPEC, owner_id=(admin if i % 2 else other).id)
            if i in (1, 3, 5):
                job.status = SUCCEEDED
            elif i == 6:
                job.status, job.error = FAILED, "out of memory \u2603 <b>"
            ids.append(job.id)
    return token, ids


def test_the_jobs_list_pages_filters_and_totals(tmp_path, database, redis_available):
    token, ids = _seed(database)
    newest_first = ids[::-1]
    with TestClient(create_app(_settings(tmp_path, database, "required"), migrate=False)) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        cases = {
            "": (newest_first, 7),
            "?limit=3": (newest_first[:3], 7),
            "?limit=3&offset=5": (newest_first[5:], 7),
            "?offset=7": ([], 7),  # past the end: the total still counted
            "?offset=1000": ([], 7),
            "?status=succeeded": ([ids[5], ids[3], ids[1]], 3),
            "?status=succeeded&offset=1": ([ids[3], ids[1]], 3),
            "?status=succeeded&offset=3": ([], 3),
            "?status=running": ([], 0),
            "?status=failed": ([ids[6]], 1),
        }
        for query, (expected, total) in cases.items():
            response = client.get(f"/api/v1/jobs{query}")
            assert response.status_code == 200, (query, response.text)
            assert response.headers["content-type"] == "application/json"
            page = JobList.model_validate_json(response.content)  # the schema the docs promise
            assert [item.id for item in page.items] == expected, query
            assert page.total == total, query
        failed = client.get("/api/v1/jobs?status=failed").json()["items"][0]
        assert failed["error"] == "out of memory \u2603 <b>" and failed["owner"] == "bo"
        assert failed["url"] == f"/api/v1/jobs/{ids[6]}"
        # the list's bytes are what the schema itself writes for the same items
        raw = client.get("/api/v1/jobs?limit=4")
        assert raw.content == JobList.model_validate_json(raw.content).model_dump_json().encode()
        for bad in ("?limit=0", "?limit=201", "?offset=-1", "?status=bogus", "?limit=x"):
            refused = client.get(f"/api/v1/jobs{bad}")
            assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][0] == "query", bad
        # the security headers and no-store on the fast path too
        assert raw.headers["x-content-type-options"] == "nosniff" and raw.headers["cache-control"] == "no-store"


def test_a_remembered_credential_is_decided_at_the_edge_and_others_still_refused(tmp_path, redis_available):
    database = f"sqlite:///{tmp_path / 'auth.db'}"
    token, _ = _seed(database)
    with TestClient(create_app(_settings(tmp_path, database, "required"), migrate=False)) as client:
        bearer = {"Authorization": f"Bearer {token}"}
        assert client.get("/api/v1/jobs", headers=bearer).status_code == 200  # looked up, now remembered
        assert auth_cache.peek(database, "token", hash_token(token)) is not None
        assert client.get("/api/v1/jobs", headers=bearer).status_code == 200  # from memory
        for headers in ({}, {"Authorization": "Bearer sgpt_nope"}, {"Authorization": "Basic abc"}):
            refused = client.get("/api/v1/jobs", headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        # a remembered token does not carry a cookie-signed POST over the API (no Bearer sent)
        cookie = client.post("/api/v1/jobs", json=SPEC, headers={"Cookie": "sparsegpt_session=x"})
        assert cookie.status_code in (401, 403)
        # /health: the details only with a credential the edge or the route recognised
        assert client.get("/health").json() == {"status": client.get("/health").json()["status"]}
        detailed = client.get("/health", headers=bearer).json()
        assert {"database", "redis", "workers"} <= detailed.keys()
        assert client.get("/health", headers={"Authorization": "Bearer sgpt_nope"}).json().keys() == {"status"}
        auth_cache.forget_all()
        detailed = client.get("/health", headers=bearer).json()  # not remembered: the route looks it up
        assert {"database", "redis", "workers"} <= detailed.keys()
        assert client.get("/api/v1/health").status_code == 401
        assert client.get("/nowhere", headers={"Authorization": "Bearer sgpt_nope"}).status_code == 404


def test_single_user_mode_answers_without_credentials(tmp_path, redis_available):
    database = f"sqlite:///{tmp_path / 'single.db'}"
    _seed(database)
    with TestClient(create_app(_settings(tmp_path, database, "off"), migrate=False)) as client:
        assert client.get("/api/v1/jobs?limit=2").json()["total"] == 7
        detailed = client.get("/health")  # the local user sees the details, as the schema has them
        assert HealthOut.model_validate_json(detailed.content).model_dump(mode="json") == detailed.json()
        assert client.get("/api/v1/health").json().keys() == detailed.json().keys()
