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


@pytest.mark.parametrize(
    "url, code",
    [
        ("/?status=bogus", 400),
        ("/jobs/0", 404),
        ("/jobs/99999999999", 404),
        ("/jobs/-1", 404),
        ("/compare?ids=1,,2;drop", 400),
        ("/compare?ids=" + ",".join(map(str, range(1, 20))), 400),
        ("/jobs/new?clone=x", 404),
        ("/compare?ids=1,999", 404),
    ],
)
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
    settings = Settings(
        data_dir=tmp_path,
        redis_url="redis://127.0.0.1:6379/11",
        auth="off",
        max_active_jobs_per_user=1,
        queue="test-pages-cap",
    )  # a queue no worker reads
    with TestClient(create_app(settings)) as client:
        with db.session_scope(settings.database) as session:
            crud.create_job(session, spec={"model": "org/m", "method": "wanda", "sparsity": "2:4"})
        unfinished = client.post("/jobs/1/retry")  # like the API: a job is retried once it has ended
        assert unfinished.status_code == 409 and "Cannot retry" in unfinished.text
        with db.session_scope(settings.database) as session:
            crud.request_cancel(session, job_id=1)
        first = client.post("/jobs/1/retry", follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"].startswith("/jobs/2")
        second = client.post("/jobs/1/retry")
        assert second.status_code == 429
        assert "Cannot retry" in second.text
    redis.Redis.from_url(settings.redis_url).delete(settings.queue)


def test_forms_as_different_users(tmp_path):
    """Signed-in users (Bearer here, the session cookie in a browser): the form makes a job of
    its sender's; only its owner or an admin cancels or retries it from the job's page."""
    from app.tokens import hash_token, new_token

    settings = Settings(
        data_dir=tmp_path, redis_url="redis://127.0.0.1:6379/11", auth="required", queue="test-pages-users"
    )  # a queue no worker reads
    with TestClient(create_app(settings), follow_redirects=False) as client:
        tokens = {}
        with db.session_scope(settings.database) as session:
            for name, admin in (("alice", False), ("bob", False), ("root", True)):
                tokens[name] = new_token()
                crud.create_user(session, name=name, token_hash=hash_token(tokens[name]), is_admin=admin)
        as_ = {name: {"Authorization": f"Bearer {token}"} for name, token in tokens.items()}
        form = {
            "model": "org/name",
            "sparsity": "2:4",
            "method": "wanda",
            "calibration_source": "c4",
            "eval_sets": "wikitext2",
            "first_block": "1",
            "include": "*.mlp.*",
        }
        created = client.post("/jobs/new", data=form, headers=as_["alice"])
        assert created.status_code == 303, created.text
        job_id = int(created.headers["location"].rsplit("/", 1)[1])
        job = client.get(f"/api/v1/jobs/{job_id}", headers=as_["bob"]).json()
        assert job["owner"] == "alice" and job["spec"]["layers"] == {
            "first_block": 1,
            "last_block": None,
            "include": ["*.mlp.*"],
            "exclude": [],
        }
        page = client.get(f"/jobs/{job_id}", headers=as_["bob"]).text
        assert 'id="cancel-job"' not in page and "only *.mlp.*" in page  # bob sees it, without Cancel

        for action in ("cancel", "retry"):
            refused = client.post(f"/jobs/{job_id}/{action}", headers=as_["bob"])
            assert refused.status_code == 403 and 'id="error-message"' in refused.text
        assert client.post(f"/jobs/{job_id}/cancel", headers=as_["alice"]).status_code == 303
        retried = client.post(f"/jobs/{job_id}/retry", headers=as_["root"])  # an admin may
        assert retried.status_code == 303 and "A%20retry" in retried.headers["location"]
        new_id = int(retried.headers["location"].split("?")[0].rsplit("/", 1)[1])
        assert client.get(f"/api/v1/jobs/{new_id}", headers=as_["root"]).json()["owner"] == "root"
        assert client.post(f"/jobs/{new_id}/cancel", headers=as_["root"]).status_code == 303
    redis.Redis.from_url(settings.redis_url).delete(settings.queue)


def test_the_job_page_charts_the_profile_target_against_achieved(client):
    """A finished job's report profile (issue 12's per-block targets) becomes the job page's
    target-vs-achieved chart; a job without one shows no such chart."""
    from app.models import Job, ModuleResult

    with db.session_scope(client.app.state.settings.database) as session:
        job = session.get(Job, 1)
        job.status, job.result = (
            "succeeded",
            {"profile": {"profile": "owl", "targets": [0.62, 0.78], "achieved": [0.6201, 0.7799]}},
        )
        session.add_all(
            [
                ModuleResult(job_id=1, block=b, name="mlp.up_proj", sparsity=s, error=0.1)
                for b, s in ((0, 0.6201), (1, 0.7799))
            ]
        )
        session.add(ModuleResult(job_id=2, block=0, name="mlp.up_proj", sparsity=0.5, error=0.1))
    page = client.get("/jobs/1")
    assert page.status_code == 200 and 'id="chart-profile"' in page.text and "owl" in page.text
    assert 'id="chart-profile"' not in client.get("/jobs/2").text


def test_the_job_page_reads_the_stored_report_old_and_whole(client):
    """The page reads a job's result as the engine's report: a result stored by the worker before it kept
    the whole report (some of its keys), the whole report with its facts (dtype, revision), and a result
    whose part no longer validates (left out, not a 500)."""
    import json
    from pathlib import Path

    from app.models import Job

    old = json.loads((Path(__file__).parents[1] / "engine" / "data" / "report_before_typing.json").read_text())
    kept = (
        "model",
        "method",
        "pattern",
        "sparsity",
        "sparsity_pruned_modules",
        "coverage",
        "experts",
        "seconds",
        "peak_memory_bytes",
        "environment",
        "profile",
        "refit",
        "zero_shot",
    )
    with db.session_scope(client.app.state.settings.database) as session:
        for job_id, result in (
            (1, {k: old[k] for k in kept}),
            (2, {**old, "revision": "r1"}),
            (3, {**old, "refit": {"layers": "many"}, "seconds": [1]}),
        ):
            job = session.get(Job, job_id)
            job.status, job.result = "succeeded", result
    for job_id in (1, 2, 3):
        page = client.get(f"/jobs/{job_id}")
        assert page.status_code == 200
        assert f'id="sparsity-all">{100 * old["sparsity"]:.2f}%' in page.text
        assert ("Refit reconstruct: mean reconstruction error" in page.text) == (job_id != 3)
        assert ("<dt>eval dense</dt>" in page.text) == (job_id != 3)
    whole = client.get("/jobs/2").text
    assert "<dt>saved weights&#39; dtype</dt><dd>float32</dd>" in whole and "<dt>revision</dt><dd>r1</dd>" in whole
    assert "saved weights" not in client.get("/jobs/1").text  # the old stored result held no dtype
    api = client.get("/api/v1/jobs/1").json()["result"]
    assert api == {k: old[k] for k in kept}  # the API returns what was stored, keys unchanged
