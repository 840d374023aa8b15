"""The installed package works on its own (the Docker image installs the wheel, not the source
tree): the wheel is built from the project's files, installed in a fresh venv that sees the
dependencies but not the repository, and its `sparsegpt` command migrates a new database, makes
a user and serves the dashboard (/login, /, static files) from a neutral working directory."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.support.paths import REPO
from tests.support.processes import base_env, free_port

# What the wheel is built from: the project's own files, nothing of the checkout's state.
SOURCES = ("pyproject.toml", "README.md", "app", "worker", "migrations", "templates")


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _isolation() -> list[str]:
    """Build with this venv's setuptools when it can make wheels (no index needed), else let pip
    fetch the build requirements."""
    try:
        import setuptools
    except ImportError:
        return []
    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    return ["--no-build-isolation"] if (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") else []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", *_isolation(), "-q", "-w", tmp / "dist"])
    (built,) = (tmp / "dist").glob("sparsegpt_service-*.whl")
    return built


def test_the_wheel_holds_every_package_templates_static_files_and_migrations(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(
        str(p.parent.relative_to(REPO))
        for top in ("app", "worker", "migrations")
        for p in (REPO / top).rglob("__init__.py")
    )
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert missing == [], f"packages missing from the wheel (list them in pyproject.toml): {missing}"
    expected = {f"app/templates/{p.name}" for p in (REPO / "templates").glob("*.html")}
    static = REPO / "app" / "static"  # with its vendor/ folder (the plan page's chart library)
    expected |= {f"app/static/{p.relative_to(static).as_posix()}" for p in static.rglob("*") if p.is_file()}
    expected |= {f"migrations/versions/{p.name}" for p in (REPO / "migrations" / "versions").glob("*.py")}
    expected |= {"migrations/script.py.mako", "migrations/env.py", "app/templates/__init__.py"}
    assert {"app/templates/login.html", "app/templates/base.html", "app/static/dashboard.js"} <= expected
    assert sorted(expected - names) == []


def test_the_installed_wheel_serves_the_dashboard(wheel, tmp_path, redis_server):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    # The dependencies come from this venv's site-packages, appended to the path by a .pth line.
    # (.pth files inside a directory added that way are not read: the repository's editable
    # finder is not loaded, so nothing of the checkout can be imported.)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    cwd = tmp_path / "run"  # neutral: no app/, templates/ or migrations/ next to it
    cwd.mkdir()
    env = {k: v for k, v in base_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(SPARSEGPT_DATA_DIR=str(tmp_path / "data"), REDIS_URL=redis_server.url, SPARSEGPT_AUTH="required")
    where = _run(
        [python, "-c", "import app, migrations, worker; print(app.__file__, migrations.__file__, worker.__file__)"],
        cwd=cwd,
        env=env,
    ).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where

    sparsegpt = venv / "bin" / "sparsegpt"
    added = _run([sparsegpt, "users", "add", "alice"], cwd=cwd, env=env)  # migrations from the wheel
    token = added.stdout.strip().splitlines()[-1]
    port = free_port()
    log = (tmp_path / "api.log").open("wb")
    api = subprocess.Popen(
        [sparsegpt, "serve", "--port", str(port), "--workers", "0", "--log-level", "warning"],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            deadline = time.monotonic() + 90
            while True:
                assert api.poll() is None, (tmp_path / "api.log").read_text()[-3000:]
                try:
                    login = client.get("/login")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the installed server did not answer"
                    time.sleep(0.2)
            assert login.status_code == 200, login.text[-2000:]
            assert "<h1>Sign in</h1>" in login.text and 'href="/static/dashboard.css"' in login.text
            csrf = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', login.text).group(1)
            assert client.get("/static/dashboard.css").status_code == 200
            icon = client.get("/favicon.ico")  # browsers ask for it before signing in: no 404 in the console
            assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
            signed_in = client.post(
                "/login",
                data={"token": token, "next": "/", "csrf_token": csrf},
                headers={"Origin": base},
                follow_redirects=True,
            )
            assert signed_in.status_code == 200, signed_in.text[-2000:]
            assert str(signed_in.url) == f"{base}/"
            assert 'id="current-user">alice' in signed_in.text and "page 1 of 1" in signed_in.text
    finally:
        if api.poll() is None:
            os.killpg(api.pid, signal.SIGTERM)
            try:
                api.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(api.pid, signal.SIGKILL)
                api.wait(timeout=5)
        log.close()
