"""`sparsegpt serve` and SPARSEGPT_AUTH: single-user mode is refused beyond loopback, sign-in is
the default on any other address, and off is the default on loopback."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.support.paths import REPO
from tests.support.processes import add_user, base_env, free_port, spawn, wait_for_health

pytestmark = pytest.mark.slow


def serve_env(tmp_path, redis_url, **extra):
    return base_env(SPARSEGPT_DATA_DIR=str(tmp_path / "data"), REDIS_URL=redis_url, **extra)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_auth_off_beyond_loopback_is_refused(tmp_path, host):
    env = serve_env(tmp_path, "redis://127.0.0.1:1/0", SPARSEGPT_AUTH="off")
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--host", host, "--port", str(free_port()), "--workers", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"SPARSEGPT_AUTH=off (single-user mode, no sign-in) is refused on --host {host}" in result.stderr
    assert not (tmp_path / "data" / "sparsegpt.db").exists(), "refused before anything started"


@pytest.mark.parametrize("host,mode", [("0.0.0.0", None), ("127.0.0.1", "required"), ("127.0.0.1", None)])
def test_default_mode_follows_the_address(tmp_path, redis_server, host, mode):
    extra = {"SPARSEGPT_AUTH": mode} if mode else {}
    env = serve_env(tmp_path, redis_server.url, **extra)
    token = add_user(env, "carol")
    port = free_port()
    api = spawn(
        ["serve", "--host", host, "--port", str(port), "--workers", "0", "--log-level", "warning"],
        env,
        tmp_path / "api.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, api)
        anonymous = httpx.get(f"{base}/api/v1/me", timeout=10)
        signed_in = httpx.get(f"{base}/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert signed_in.status_code == 200 and signed_in.json()["name"] == "carol"
        if host == "127.0.0.1" and mode is None:
            assert anonymous.status_code == 200 and anonymous.json() == {
                "name": "(local)",
                "is_admin": True,
                "local": True,
            }
        else:
            assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    finally:
        api.stop()


def test_users_cli_token_rotation_and_removal(tmp_path, redis_server):
    """A new token replaces the old one (and ends its sessions); a removed user is refused."""
    env = serve_env(tmp_path, redis_server.url, SPARSEGPT_AUTH="required")
    old = add_user(env, "dave")

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "users", *a],
            cwd=REPO,
            env=env,  # noqa: E731
            capture_output=True,
            text=True,
            timeout=60,
        )

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


def test_single_user_mode_curl_as_written_and_the_local_users_token(tmp_path, redis_server, models_dir):
    """On loopback without sign-in, the docs' curl lines work with TOKEN unset, and `sparsegpt users token`
    (no NAME) gives a token that is the browser's local user: her browser jobs are hers to cancel by curl."""
    env = serve_env(tmp_path, redis_server.url, SPARSEGPT_LOCAL_DIRS=str(models_dir))
    carol = add_user(env, "carol")
    made = subprocess.run(
        [sys.executable, "-m", "app.cli", "users", "token"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0 and "(local)" in made.stdout, made.stdout + made.stderr
    local_token = made.stdout.strip().splitlines()[-1]
    listed = subprocess.run(
        [sys.executable, "-m", "app.cli", "users", "list"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "(local)" in listed and "carol" in listed
    port = free_port()
    api = spawn(["serve", "--port", str(port), "--workers", "0", "--log-level", "warning"], env, tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    spec = {
        "model": str(models_dir / "llama"),
        "sparsity": 0.5,
        "calibration": {"dataset": str(models_dir / "calib.txt"), "nsamples": 4, "seqlen": 32},
        "evaluation": {"datasets": []},
    }
    try:
        wait_for_health(base, api)
        unset = {"Authorization": "Bearer"}  # curl -H "Authorization: Bearer $TOKEN", TOKEN unset (the server trims)
        assert httpx.get(f"{base}/api/v1/me", headers=unset, timeout=10).json()["name"] == "(local)"
        browser_job = httpx.post(f"{base}/api/v1/jobs", json=spec, headers=unset, timeout=30)  # the local user's
        assert browser_job.status_code == 201, browser_job.text
        job = browser_job.json()["id"]
        me = httpx.get(f"{base}/api/v1/me", headers={"Authorization": f"Bearer {local_token}"}, timeout=10).json()
        assert me == {"name": "(local)", "is_admin": True, "local": True}
        refused = httpx.post(
            f"{base}/api/v1/jobs/{job}/cancel", headers={"Authorization": f"Bearer {carol}"}, timeout=10
        )
        assert refused.status_code == 403  # another account's token is that account, not the local user
        cancelled = httpx.post(
            f"{base}/api/v1/jobs/{job}/cancel", headers={"Authorization": f"Bearer {local_token}"}, timeout=10
        )
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        wrong = httpx.get(f"{base}/api/v1/me", headers={"Authorization": "Bearer sgpt_typo"}, timeout=10)
        assert wrong.status_code == 401  # a token that is given must still be a real one
    finally:
        api.stop()
