"""Fixtures for the dashboard tests: the real service (``sparsegpt serve --workers 0``), one
real Celery worker process, Redis and SQLite (or PostgreSQL), and headless Debian Chromium
driven by Playwright for Python.

- Redis database 11 (SPARSEGPT_TEST_DASHBOARD_REDIS_DB), flushed at the start; a random queue.
- SPARSEGPT_TEST_DASHBOARD_BACKEND=postgresql runs it on a fresh PostgreSQL database instead
  of a SQLite file.
- Chromium from CHROMIUM_PATH (default /usr/bin/chromium); never downloaded.
- Screenshots of every page go to test-artifacts/dashboard/ (gitignored).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import (  # noqa: F401 - fixtures used by name
    REDIS_BASE,
    REPO,
    Service,
    free_port,
    pg_database,
    redis_available,
    spawn,
    wait_for_health,
)

REDIS_DB = int(os.environ.get("SPARSEGPT_TEST_DASHBOARD_REDIS_DB", "11"))
BACKEND = os.environ.get("SPARSEGPT_TEST_DASHBOARD_BACKEND", "sqlite")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SHOTS = REPO / "test-artifacts" / "dashboard"
WIKITEXT = Path("/work/shared/data/wikitext-2/valid.txt")
UPLOAD_LIMIT = 512 * 1024


@pytest.fixture(scope="session")
def allowed_dir(tmp_path_factory) -> Path:
    """The server's allowed directory: a tiny LLaMA, a deeper one (to cancel), text files."""
    from tests.tiny_models import make_tiny_model, sample_text

    root = tmp_path_factory.mktemp("allowed")
    make_tiny_model(root / "llama")
    make_tiny_model(root / "llama-deep", blocks=8, hidden=192)  # seconds per block: time to cancel
    if WIKITEXT.exists():
        shutil.copy(WIKITEXT, root / "valid.txt")
    else:
        (root / "valid.txt").write_text(sample_text(200_000), encoding="utf-8")
    text = (root / "valid.txt").read_text(encoding="utf-8")
    (root / "calibration.txt").write_text(text[:60_000], encoding="utf-8")  # what the form uploads
    (root / "eval.txt").write_text(text[60_000:90_000], encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def dashboard(redis_available, allowed_dir, tmp_path_factory, request) -> Iterator[Service]:  # noqa: F811
    import redis

    data = tmp_path_factory.mktemp("dashboard-data")
    logs = tmp_path_factory.mktemp("dashboard-logs")
    if BACKEND == "postgresql":
        database = request.getfixturevalue("pg_database")
    else:
        database = f"sqlite:///{data / 'sparsegpt.db'}"
    redis_url = f"{REDIS_BASE}/{REDIS_DB}"
    redis.Redis.from_url(redis_url).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEGPT_")}
    env.update(
        SPARSEGPT_DATA_DIR=str(data), DATABASE_URL=database, REDIS_URL=redis_url,
        SPARSEGPT_LOCAL_DIRS=str(allowed_dir), SPARSEGPT_QUEUE=f"test-dashboard-{secrets.token_hex(3)}",
        SPARSEGPT_WORKER_DEVICE="cpu", SPARSEGPT_HEARTBEAT_INTERVAL_S="0.5",
        SPARSEGPT_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT), SPARSEGPT_MAX_NSAMPLES="512", SPARSEGPT_MAX_SEQLEN="4096",
        PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
    )
    port = free_port()
    api = spawn(["serve", "--workers", "0", "--port", str(port), "--log-level", "warning"], env, logs / "api.log")
    base = f"http://127.0.0.1:{port}"
    worker = None
    try:
        wait_for_health(base, api)
        worker = spawn(["worker", "--hostname=test-dashboard@%h", "--loglevel=info"], env, logs / "worker.log")
        wait_for_health(base, worker, worker="test-dashboard@")
        with httpx.Client(base_url=base, timeout=30) as client:
            yield Service(base, env, api, worker, client)
    finally:
        if worker is not None:
            worker.stop()
        api.stop()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, dashboard):
    context = browser.new_context(base_url=dashboard.base, viewport={"width": 1360, "height": 900}, accept_downloads=True)
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.js_errors = errors
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the pages: {errors}"


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
