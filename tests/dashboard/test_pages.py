"""Server-rendered pages without a worker or a browser: pagination and filters of the jobs
table, the disk summary, and bad query strings (clear 4xx pages, never a 500)."""

from __future__ import annotations

import re

import pytest
import redis
from fastapi.testclient import TestClient

from app import crud, db
from app.config import Settings
from app.main import create_app
from app.models import CANCELLED


@pytest.fixture()
def client(tmp_path):
    settings = Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:6379/11", auth="off")  # Redis is not used here
    app = create_app(settings)
    with TestClient(app) as client:
        with db.session_scope(settings.database) as session:
            for i in range(25):
                job = crud.create_job(session, spec={"model": f"org/m{i}", "method": "wanda", "sparsity": "2:4"})
                if i % 5 == 0:
                    crud.request_cancel(session, job_id=job.id)
        yield client


def row_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<tr id="job-(\d+)"', html)]


def test_pagination_newest_first(client):
    first = client.get("/")
    assert first.status_code == 200
    assert row_ids(first.text) == list(range(25, 5, -1))
    assert "page 1 of 2" in first.text and 'id="next-page"' in first.text and 'id="prev-page"' not in first.text
    second = client.get("/?page=2")
    assert row_ids(second.text) == [5, 4, 3, 2, 1]
    assert "page 2 of 2" in second.text and 'id="prev-page"' in second.text
    assert row_ids(client.get("/?page=abc").text) == row_ids(first.text)  # a bad page number is page 1


def test_status_filter_and_counts(client):
    page = client.get("/?status=cancelled")
    assert row_ids(page.text) == [21, 16, 11, 6, 1]
    assert re.search(r'data-status="cancelled">cancelled <span class="count">5</span>', page.text)
    assert re.search(r'data-status="queued">queued <span class="count">20</span>', page.text)
    assert 'id="disk-artifacts">0 B<' in page.text


@pytest.mark.parametrize("url, code", [
    ("/?status=bogus", 400), ("/jobs/0", 404), ("/jobs/99999999999", 404), ("/jobs/-1", 404),
    ("/compare?ids=1,,2;drop", 400), ("/compare?ids=" + ",".join(map(str, range(1, 20))), 400),
    ("/jobs/new?clone=x", 404), ("/compare?ids=1,999", 404),
])
def test_bad_queries_are_pages_not_errors(client, url, code):
    response = client.get(url)
    assert response.status_code == code
    assert response.headers["content-type"].startswith("text/html") and 'id="error-message"' in response.text


def test_form_post_without_fields_is_a_form_with_errors(client):
    response = client.post("/jobs/new", data={})
    assert response.status_code == 422
    assert 'id="error-model"' in response.text and 'id="error-calibration_source"' in response.text


def test_cancel_and_retry_forms(client):
    assert client.post("/jobs/2/cancel", follow_redirects=False).headers["location"].startswith("/jobs/2?message=")
    assert client.post("/jobs/1/cancel").status_code == 200  # already cancelled: says so
    assert client.post("/jobs/999/cancel").status_code == 404
    assert client.post("/jobs/999/retry").status_code == 404


def test_dashboard_submissions_obey_the_per_user_cap(tmp_path):
    """Retry (like the form) goes through the API's create path: cap reached -> 429 with the reason."""
    settings = Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:6379/11", auth="off",
                        max_active_jobs_per_user=1, queue="test-pages-cap")  # a queue no worker reads
    with TestClient(create_app(settings)) as client:
        with db.session_scope(settings.database) as session:
            crud.create_job(session, spec={"model": "org/m", "method": "wanda", "sparsity": "2:4"})
        first = client.post("/jobs/1/retry", follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"].startswith("/jobs/2")
        second = client.post("/jobs/1/retry")
        assert second.status_code == 429
        assert "Cannot retry" in second.text
    redis.Redis.from_url(settings.redis_url).delete(settings.queue)
