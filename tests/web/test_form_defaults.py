"""The new-job form on this server as it is: no built-in set it cannot load is picked by default,
and the model field tells how long this server took for a model it pruned before."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from app import crud, db
from app.config import Settings
from app.main import create_app
from app.models import ModuleResult, utcnow
from app.web.forms import FORM_DEFAULTS, HELP
from worker.engine.contract.spec_fields import leaf_fields


@pytest.fixture()
def client(tmp_path, redis_available):
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        redis_url="redis://127.0.0.1:6379/11",
        auth="off",
        queue=f"test-form-{uuid.uuid4().hex[:8]}",
        sweep_interval_s=0,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def checked(html: str, name: str) -> list[str]:
    return re.findall(rf'name="{name}" value="([^"]+)" checked', html)


def test_offline_without_the_sets_cached_no_hub_default_is_picked(client, monkeypatch, tmp_path):
    assert FORM_DEFAULTS["calibration_source"] == "c4" and FORM_DEFAULTS["eval_sets"] == ["wikitext2"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    html = client.get("/jobs/new").text
    assert checked(html, "calibration_source") == ["file"] and checked(html, "eval_sets") == []
    assert html.count("(not on this server now)") == 6  # c4, wikitext2, ptb: as calibration and as evaluation
    assert "is not in this server&#39;s cache" in html or "is not in this server's cache" in html


def test_with_the_sets_in_the_cache_the_defaults_stay(client, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the session's cache holds them (tests/support/hub_cache.py)
    html = client.get("/jobs/new").text
    assert checked(html, "calibration_source") == ["c4"] and checked(html, "eval_sets") == ["wikitext2"]
    assert "(not on this server now)" not in html


def test_the_form_tells_how_long_a_model_took_here(client):
    now = utcnow()
    with db.session_scope(client.app.state.settings.database) as session:
        for seconds, blocks in ((300, 3), (100, 1)):  # 400 s over 4 blocks: 100 s a block; the model has 3
            job = crud.create_job(session, spec={"model": "org/known", "method": "sparsegpt", "sparsity": "2:4"})
            job.status, job.started_at, job.finished_at = "succeeded", now - timedelta(seconds=seconds), now
            session.flush()
            session.add_all(
                [
                    ModuleResult(job_id=job.id, block=b, name="mlp.up_proj", sparsity=0.5, error=0.1, seconds=1.0)
                    for b in range(blocks)
                ]
            )
    html = client.get("/jobs/new").text
    row = re.search(r'<tr data-model="org/known" data-total="([^"]+)">(.*?)</tr>', html, re.S)
    assert row and row.group(1) == "5m 00s", html[:500]  # 3 blocks x 100 s
    assert "<td>3</td><td>1m 40s</td><td>5m 00s</td>" in row.group(2)


def test_the_forms_help_is_the_specs_descriptions():
    html_free = {leaf.ui.form: leaf.info.description for leaf in leaf_fields() if leaf.ui.form}
    for name, description in html_free.items():
        text = HELP[name]
        assert text[1:] == (description or "").replace("null:", "empty:").replace("[]:", "empty:")[1:], name


def test_the_template_has_no_hand_written_help_for_a_spec_field(client):
    """Each spec field's input on the rendered form is followed by the spec's description as its
    help (the inputs come from templates/_macros.html, so the page is checked, not the source)."""
    import html as html_lib

    page = client.get("/jobs/new").text
    for name, text in HELP.items():
        block = re.search(rf'name="{name}".*?<p class="help"[^>]*>(.*?)</p>', page, re.S)
        assert block, f"{name}: no input with its help on the form"
        if not html_lib.unescape(block.group(1)).startswith(text):
            pytest.fail(f"{name}: its help is not the spec's description: {block.group(1)[:80]}")


def test_the_duration_hint_follows_the_model_field_in_a_browser(client, browser):
    """Chromium on the form as this app serves it (its requests answered by the app in-process)."""
    now = utcnow()
    with db.session_scope(client.app.state.settings.database) as session:
        job = crud.create_job(session, spec={"model": "org/known", "method": "sparsegpt", "sparsity": "2:4"})
        job.status, job.started_at, job.finished_at = "succeeded", now - timedelta(seconds=200), now
        session.flush()
        session.add_all(
            [ModuleResult(job_id=job.id, block=b, name="q", sparsity=0.5, error=0.1, seconds=1.0) for b in range(2)]
        )

    def answer(route):
        path = route.request.url.split("form.test", 1)[1]
        response = client.get(path)
        route.fulfill(
            status=response.status_code,
            body=response.content,
            headers={"content-type": response.headers.get("content-type", "text/html")},
        )

    context = browser.new_context()
    page = context.new_page()
    try:
        page.route("http://form.test/**", answer)
        page.goto("http://form.test/jobs/new")
        hint = page.locator("#duration-hint")
        assert hint.is_hidden()
        page.fill("#model", "org/known")
        assert hint.is_visible() and "about 3m 20s" in hint.text_content()
        page.fill("#model", "org/other")
        assert hint.is_hidden()
    finally:
        context.close()
