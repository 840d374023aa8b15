"""A malformed Idempotency-Key is refused (422, the reason named) before anything is made, on both
POSTs that take one (a job, a plan), with a body that is otherwise valid."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app import db
from app.config import Settings
from app.main import create_app
from app.models import Job, Plan

BODIES = {
    "/api/v1/jobs": {"model": "facebook/opt-125m", "sparsity": 0.5},
    "/api/v1/plans": {"model": "facebook/opt-125m", "grid": {"sparsities": ["0.5"]}},
}


@pytest.fixture()
def client(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path, redis_url="redis://127.0.0.1:6379/11", auth="off")
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("url", sorted(BODIES))
@pytest.mark.parametrize("key", ["bad key", "tab\there", "ctl\x7f", ""])
def test_a_malformed_key_is_refused(client, url, key):
    response = client.post(url, json=BODIES[url], headers={"Idempotency-Key": key})
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == "Idempotency-Key: 1 to 255 visible ASCII characters (a UUID, for example)"
    with db.session_scope(client.app.state.settings.database) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(Plan)) == 0
