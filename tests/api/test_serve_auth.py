"""`sparsegpt serve` and SPARSEGPT_AUTH: single-user mode is refused beyond loopback, sign-in is
the default on any other address, and off is the default on loopback."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.support.paths import REPO

from tests.support.processes import free_port, spawn, wait_for_health
from tests.support.processes import add_user, base_env

pytestmark = pytest.mark.slow


def serve_env(tmp_path, redis_url, **extra):
    return base_env(SPARSEGPT_DATA_DIR=str(tmp_path / "data"), REDIS_URL=redis_url, **extra)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_auth_off_beyond_loopback_is_refused(tmp_path, host):
    env = serve_env(tmp_path, "redis://127.0.0.1:1/0", SPARSEGPT_AUTH="off")
    result = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--host", host, "--port", str(free_port()), "--workers", "0"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"SPARSEGPT_AUTH=off (single-user mode, no sign-in) is refused on --host {host}" in result.stderr
    assert not (tmp_path / "data" / "sparsegpt.db").exists(), "refused before anything started"


@pytest.mark.parametrize("host,mode", [("0.0.0.0", None), ("127.0.0.1", "required"), ("127.0.0.1", None)])
def test_default_mode_follows_the_address(tmp_path, redis_server, host, mode):
    extra = {"SPARSEGPT_AUTH": mode} if mode else {}
    env = serve_env(tmp_path, redis_server.url, **extra)
    token = add_user(env, "carol")
    port = free_port()
    api = spawn(["serve", "--host", host, "--port", str(port), "--workers", "0", "--log-level", "warning"], env, tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, api)
        anonymous = httpx.get(f"{base}/api/v1/me", timeout=10)
        signed_in = httpx.get(f"{base}/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert signed_in.status_code == 200 and signed_in.json()["name"] == "carol"
        if host == "127.0.0.1" and mode is None:
            assert anonymous.status_code == 200 and anonymous.json() == {"name": "(local)", "is_admin": True, "local": True}
        else:
            assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    finally:
        api.stop()


def test_users_cli_token_rotation_and_removal(tmp_path, redis_server):
    """A new token replaces the old one (and ends its sessions); a removed user is refused."""
    env = serve_env(tmp_path, redis_server.url, SPARSEGPT_AUTH="required")
    old = add_user(env, "dave")
    run = lambda *a: subprocess.run([sys.executable, "-m", "app.cli", "users", *a], cwd=REPO, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    rotated = run("token", "dave")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    new = rotated.stdout.strip().splitlines()[-1]
    assert new.startswith("sgpt_") and new != old
    assert run("token", "nobody").returncode == 1
    port = free_port()
    api = spawn(["serve", "--port", str(port), "--workers", "0", "--log-level", "warning"], env, tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, api)
        me = lambda token: httpx.get(f"{base}/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)  # noqa: E731
        assert me(old).status_code == 401 and me(new).status_code == 200
        login = httpx.post(f"{base}/login", data={"token": new, "next": "/"}, timeout=10)
        cookie = login.cookies["sparsegpt_session"]
        assert httpx.get(f"{base}/api/v1/me", cookies={"sparsegpt_session": cookie}, timeout=10).status_code == 200
        assert run("remove", "dave").returncode == 0
        assert "dave" not in run("list").stdout
        assert me(new).status_code == 401
        assert httpx.get(f"{base}/api/v1/me", cookies={"sparsegpt_session": cookie}, timeout=10).status_code == 401
    finally:
        api.stop()
