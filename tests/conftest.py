"""Fixtures every test directory shares (helpers live in tests/support/).

- Redis from SPARSEGPT_TEST_REDIS_URL (default redis://127.0.0.1:6379): database 13 for SQLite
  runs of the shared service, 14 for PostgreSQL ones, flushed at the start; queues get a
  random name. ``redis_server`` / ``module_redis``: a redis-server of a test's own.
- PostgreSQL from SPARSEGPT_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test):
  scratch databases created for the session and dropped after.
- ``service``: the API (``sparsegpt serve --workers 0``) and one worker (``sparsegpt worker``) as
  subprocesses, per backend ("sqlite" and "postgresql"), shared by the tests that use it.
- ``make_stack``: API and workers for one test, which it may kill -9 and restart.
- ``models_dir``: the allowed local directory (tiny LLaMAs and a text file).
- ``dashboard``: the service and a worker for the browser tests (Redis database 11,
  SPARSEGPT_TEST_DASHBOARD_REDIS_DB; SPARSEGPT_TEST_DASHBOARD_BACKEND=postgresql for PostgreSQL),
  with ``allowed_dir``; ``browser`` / ``page``: headless Chromium (CHROMIUM_PATH).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from tests.support import hub_cache

# Before anything imports huggingface_hub (it reads the cache's place once): a Hub cache that holds
# the few Hub ids and built-in sets the tests queue jobs with (tests/support/hub_cache.py).
os.environ["HF_HUB_CACHE"] = str(hub_cache.seed())

import httpx
import pytest

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.paths import WIKITEXT_VALID
from tests.support.pg import scratch_database
from tests.support.processes import RedisServer, add_user, base_env, free_port, spawn, wait_for_health
from tests.support.stacks import UPLOAD_LIMIT, Service, Stack

REDIS_BASE = os.environ.get("SPARSEGPT_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
REDIS_DB = {"sqlite": 13, "postgresql": 14}


def _redis_url(backend: str) -> str:
    return f"{REDIS_BASE}/{REDIS_DB[backend]}"


@pytest.fixture(scope="session")
def redis_available() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_BASE + "/0", socket_connect_timeout=2).ping()
    except redis.RedisError as err:
        pytest.skip(f"no Redis at {REDIS_BASE} ({err}); set SPARSEGPT_TEST_REDIS_URL")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A database of its own on the PostgreSQL server, dropped at the end of the session."""
    with scratch_database("sparsegpt_test") as url:
        yield url


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The allowed local directory: a tiny LLaMA, a bigger one for cancelling, a text file."""
    from tests.support.tiny_models import make_tiny_model, sample_text

    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root / "llama")
    make_tiny_model(root / "llama-deep", blocks=8, hidden=128)
    (root / "calib.txt").write_text(sample_text(12_000), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def calib_bytes(models_dir) -> bytes:
    return (models_dir / "calib.txt").read_bytes()


@pytest.fixture(scope="session")
def service_env(backend, redis_available, models_dir, tmp_path_factory, request) -> dict[str, str]:
    """Environment for this backend's API and worker processes (and its in-process Settings)."""
    import redis

    data = tmp_path_factory.mktemp(f"data-{backend}")
    if backend == "postgresql":
        database = request.getfixturevalue("pg_database")
    else:
        database = f"sqlite:///{data / 'sparsegpt.db'}"
    redis.Redis.from_url(_redis_url(backend)).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEGPT_")}
    env.update(
        SPARSEGPT_DATA_DIR=str(data),
        DATABASE_URL=database,
        REDIS_URL=_redis_url(backend),
        SPARSEGPT_LOCAL_DIRS=str(models_dir),
        SPARSEGPT_QUEUE=f"test-{backend}-{secrets.token_hex(3)}",
        SPARSEGPT_WORKER_DEVICE="cpu",
        SPARSEGPT_HEARTBEAT_INTERVAL_S="0.5",
        SPARSEGPT_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
        SPARSEGPT_MAX_NSAMPLES="512",
        SPARSEGPT_MAX_SEQLEN="4096",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    return env


@pytest.fixture(scope="session")
def service(backend, service_env, tmp_path_factory) -> Iterator[Service]:
    """The API and one worker for this backend, as real processes."""
    yield from run_service(service_env, tmp_path_factory.mktemp(f"logs-{backend}"), f"test-{backend}")


def run_service(env: dict[str, str], logs: Path, worker_name: str) -> Iterator[Service]:
    """``sparsegpt serve --workers 0`` and one ``sparsegpt worker``, until the generator closes."""
    port = free_port()
    api = spawn(["serve", "--workers", "0", "--port", str(port), "--log-level", "warning"], env, logs / "api.log")
    base = f"http://127.0.0.1:{port}"
    worker = None
    try:
        wait_for_health(base, api)
        worker = spawn(["worker", f"--hostname={worker_name}@%h", "--loglevel=info"], env, logs / "worker.log")
        wait_for_health(base, worker, worker=f"{worker_name}@")
        with httpx.Client(base_url=base, timeout=30) as client:
            yield Service(base, env, api, worker, client)
    finally:
        if worker is not None:
            worker.stop()
        api.stop()


@pytest.fixture(scope="session")
def redis_binary() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("needs a redis-server binary on PATH")


@pytest.fixture
def redis_server(redis_binary, tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def team_pg() -> Iterator[str]:
    """A PostgreSQL database of its own, dropped at the end of the session."""
    with scratch_database("sparsegpt_team") as url:
        yield url


@pytest.fixture
def make_stack(team_pg, models_dir, tmp_path) -> Iterator:
    """make_stack(redis_url, **settings) -> a Stack with its environment (no process started)."""
    stacks: list[Stack] = []

    def make(redis_url: str, **settings: str) -> Stack:
        data = tmp_path / f"data{len(stacks)}"
        env = base_env(
            SPARSEGPT_DATA_DIR=str(data),
            DATABASE_URL=team_pg,
            REDIS_URL=redis_url,
            SPARSEGPT_LOCAL_DIRS=str(models_dir),
            SPARSEGPT_QUEUE=f"team-{secrets.token_hex(3)}",
            SPARSEGPT_AUTH="required",
            SPARSEGPT_HEARTBEAT_INTERVAL_S="0.5",
            SPARSEGPT_MIN_FREE_DISK_MB="1",
        )
        env.update({f"SPARSEGPT_{k.upper()}": str(v) for k, v in settings.items()})
        logs = tmp_path / f"logs{len(stacks)}"
        logs.mkdir()
        stack = Stack(env, logs)
        stack.token = add_user(env, f"admin{secrets.token_hex(3)}", admin=True)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture(scope="module")
def module_redis(redis_binary, tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


# --- the dashboard: its own service, and the browser -------------------------------------------

DASHBOARD_REDIS_DB = int(os.environ.get("SPARSEGPT_TEST_DASHBOARD_REDIS_DB", "11"))
DASHBOARD_BACKEND = os.environ.get("SPARSEGPT_TEST_DASHBOARD_BACKEND", "sqlite")
DASHBOARD_UPLOAD_LIMIT = 512 * 1024


@pytest.fixture(scope="session")
def allowed_dir(tmp_path_factory) -> Path:
    """The server's allowed directory: a tiny LLaMA, a deeper one (to cancel), text files."""
    from tests.support.tiny_models import make_tiny_model, sample_text

    root = tmp_path_factory.mktemp("allowed")
    make_tiny_model(root / "llama")
    make_tiny_model(root / "llama-deep", blocks=8, hidden=192)  # seconds per block: time to cancel
    if WIKITEXT_VALID.exists():
        shutil.copy(WIKITEXT_VALID, root / "valid.txt")
    else:
        (root / "valid.txt").write_text(sample_text(200_000), encoding="utf-8")
    text = (root / "valid.txt").read_text(encoding="utf-8")
    (root / "calibration.txt").write_text(text[:60_000], encoding="utf-8")  # what the form uploads
    (root / "eval.txt").write_text(text[60_000:90_000], encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def dashboard(redis_available, allowed_dir, tmp_path_factory, request) -> Iterator[Service]:
    import redis

    data = tmp_path_factory.mktemp("dashboard-data")
    logs = tmp_path_factory.mktemp("dashboard-logs")
    if DASHBOARD_BACKEND == "postgresql":
        database = request.getfixturevalue("pg_database")
    else:
        database = f"sqlite:///{data / 'sparsegpt.db'}"
    redis_url = f"{REDIS_BASE}/{DASHBOARD_REDIS_DB}"
    redis.Redis.from_url(redis_url).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEGPT_")}
    env.update(
        SPARSEGPT_DATA_DIR=str(data),
        DATABASE_URL=database,
        REDIS_URL=redis_url,
        SPARSEGPT_LOCAL_DIRS=str(allowed_dir),
        SPARSEGPT_QUEUE=f"test-dashboard-{secrets.token_hex(3)}",
        SPARSEGPT_WORKER_DEVICE="cpu",
        SPARSEGPT_HEARTBEAT_INTERVAL_S="0.5",
        SPARSEGPT_MAX_UPLOAD_BYTES=str(DASHBOARD_UPLOAD_LIMIT),
        SPARSEGPT_MAX_NSAMPLES="512",
        SPARSEGPT_MAX_SEQLEN="4096",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    yield from run_service(env, logs, "test-dashboard")


# Per module, not per session: sync Playwright keeps an event loop running in the main thread while
# it is open, which would stop later modules' own asyncio loops (tests/support/sse_clients.py).
@pytest.fixture(scope="module")
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
    context = browser.new_context(
        base_url=dashboard.base, viewport={"width": 1360, "height": 900}, accept_downloads=True
    )
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.js_errors = errors
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the pages: {errors}"
