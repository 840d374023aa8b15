"""A newcomer's first hour: the README's quickstart works without the internet (a local model
and text file allowed with `sparsegpt serve --allow-dir`, the job made in the browser), a second
`scripts/serve` starts without a package index, the console stays quiet (no Celery banner or
root warning, no favicon 404), and the README links only to files of the repository."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time

import httpx
import pytest

from tests.support.paths import REPO
from tests.support.processes import base_env, free_port, kill_group, spawn, wait_for_health
from tests.support.tiny_models import make_tiny_model, sample_text

LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|href=\"([^\"]+)\"")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("doc", ["README.md", "docs/ARCHITECTURE.md", "docs/DEPLOY.md", "benchmarks/README.md"])
def test_docs_link_only_to_files_of_the_repository(doc):
    path = REPO / doc
    text = path.read_text(encoding="utf-8")
    bad = []
    for match in LINK.finditer(text):
        target = (match.group(1) or match.group(2)).split("#")[0]
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            continue  # a URL (https:, mailto:) or a route of the service
        resolved = (path.parent / target).resolve()
        if not resolved.is_relative_to(REPO) or not resolved.exists():
            bad.append(target)
    bad += re.findall(r"`(\.\./[^`]+\.md)`", text)  # a document outside the checkout, named in code style
    assert not bad, f"{doc} points outside the repository or at missing files: {bad}"


def test_a_second_start_needs_no_package_index(tmp_path):
    """scripts/serve on a complete .venv: no pip (the index is unreachable), up in seconds."""
    port = free_port()
    env = base_env(
        SPARSEGPT_DATA_DIR=str(tmp_path / "data"),
        PIP_INDEX_URL=f"http://127.0.0.1:{_closed_port()}/simple",
        PIP_NO_INDEX="1",
    )
    log = tmp_path / "serve.log"
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(REPO / "scripts" / "serve"), "--workers", "0", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        started = time.monotonic() - t0
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)
    output = log.read_text()
    assert "bootstrap:" not in output, output  # not even the environment check had to speak
    print(f"second start: /health answered after {started:.1f} s")
    assert started < 20, f"{started:.1f} s to start"
    stamp = (REPO / ".venv" / ".bootstrap-gguf").read_text()
    import hashlib

    wanted = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + (REPO / "requirements" / "lock.txt").read_bytes())
    assert stamp.startswith(wanted.hexdigest())  # the stamp of pyproject.toml and the lock, as scripts/bootstrap writes


def test_serve_allow_dir_refuses_a_missing_directory(tmp_path):
    t0 = time.monotonic()
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-m", "app.cli", "serve", "--allow-dir", str(tmp_path / "nope")],
        cwd=REPO,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and time.monotonic() - t0 < 5
    assert result.stderr.strip() == f"sparsegpt serve: error: --allow-dir {tmp_path / 'nope'}: no such directory"


@pytest.mark.slow
def test_offline_quickstart_in_the_browser(browser, tmp_path):
    """The README's first screen: serve --allow-dir DIR, a local model and text file, the form,
    the job runs and its model downloads; the Hub unreachable all along."""
    from playwright.sync_api import expect

    models = tmp_path / "models"
    make_tiny_model(models / "tiny")
    (models / "notes.txt").write_text(sample_text(20_000), encoding="utf-8")
    env = base_env(
        SPARSEGPT_DATA_DIR=str(tmp_path / "data"),
        HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
        HF_HOME=str(tmp_path / "hf-home"),
    )
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(name, None)
    port = free_port()
    serve = spawn(["serve", "--allow-dir", str(models), "--port", str(port)], env, tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    context = None
    try:
        wait_for_health(base, serve, worker="local0@", timeout=90)
        context = browser.new_context(base_url=base, accept_downloads=True)
        context.set_default_timeout(20_000)
        page = context.new_page()
        missing: list[str] = []
        page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
        page.goto("/jobs/new")
        expect(page.locator("#allowed-dirs")).to_contain_text(str(models.resolve()))
        page.fill("#model", str(models / "tiny"))
        page.fill("#sparsity", "0.5")
        page.check("input[name=calibration_source][value=path]")
        page.fill("#calibration_path", str(models / "notes.txt"))
        page.fill("#nsamples", "4")
        page.fill("#seqlen", "32")
        page.uncheck("input[name=eval_sets][value=wikitext2]")
        page.fill("#eval_extra", str(models / "notes.txt"))
        page.fill("#max_windows", "2")
        page.click("#submit-job")
        expect(page).to_have_url(re.compile(r"/jobs/\d+$"))
        page.wait_for_function("document.querySelector('#job-main').dataset.status === 'succeeded'", timeout=120_000)
        expect(page.locator("#download")).to_be_visible()
        assert missing == [], f"404s: {missing}"
        icon = httpx.get(f"{base}/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    finally:
        if context is not None:
            context.close()
        serve.stop()
        kill_group(serve)
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "superuser privileges" not in log and "-------------- [queues]" not in log and "celery@" not in log, log[
        -3000:
    ]
    assert "Retrying" not in log, log[-3000:]


def test_scripts_are_executable():
    for name in ("serve", "bootstrap", "test"):
        assert os.access(REPO / "scripts" / name, os.X_OK), name
    assert shutil.which("sha256sum"), "scripts/bootstrap stamps pyproject.toml with sha256sum"
