"""The dashboard's sessions live on the server (``web_sessions``): logging out ends the session
for every copy of its cookie; a new token or removing the user ends all of a user's sessions;
an expired or unknown row admits nobody even with a well-signed cookie. Real server process,
real HTTP."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import timedelta

import httpx
import pytest
from itsdangerous import URLSafeTimedSerializer
from sqlalchemy import select, update

from app import db
from app.models import WebSession, utcnow
from tests.support.paths import REPO
from tests.support.web_server import form_token, web_server

SESSION = "sparsegpt_session"


@pytest.fixture(scope="module")
def server(module_redis, tmp_path_factory):
    with web_server(
        tmp_path_factory.mktemp("sessions"), module_redis.url, users=("alice", "bob", "carol", "dave")
    ) as s:
        yield s


def me(server, cookie: str) -> httpx.Response:
    return httpx.get(f"{server.base}/api/v1/me", cookies={SESSION: cookie}, timeout=10)


def rows(server, name: str | None = None) -> list[WebSession]:
    from app import crud

    with db.session_scope(server.database) as session:
        query = select(WebSession).order_by(WebSession.created_at)
        if name is not None:
            query = query.where(WebSession.user_id == crud.get_user_by_name(session, name).id)
        return list(session.scalars(query))


def users_cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "users", *args],
        cwd=REPO,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_logout_ends_the_session_for_a_copy_of_the_cookie(server):
    with server.browser() as browser:
        cookie = server.sign_in(browser, "alice")
        assert me(server, cookie).json()["name"] == "alice"
        page = browser.get("/")
        assert page.status_code == 200
        out = browser.post("/logout", data={"csrf_token": form_token(page.text)} if "csrf_token" in page.text else {})
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert SESSION not in browser.cookies  # the browser forgets it...
    # ...and a copy kept elsewhere (another tab, a stolen cookie) no longer works either.
    assert me(server, cookie).status_code == 401
    copied = httpx.get(f"{server.base}/", cookies={SESSION: cookie}, headers={"Accept": "text/html"}, timeout=10)
    assert copied.status_code == 303 and copied.headers["location"].startswith("/login")
    (row,) = rows(server, "alice")
    assert row.revoked_at is not None
    assert 'id="logout-form" method="post"' in page.text or 'method="post" action="/logout"' in page.text


def test_get_logout_is_a_page_with_the_button_and_ends_nothing(server):
    with server.browser() as browser:
        cookie = server.sign_in(browser, "bob")
        page = browser.get("/logout")
        assert page.status_code == 200 and 'id="logout-confirm"' in page.text and 'action="/logout"' in page.text
        assert me(server, cookie).status_code == 200
    assert httpx.get(f"{server.base}/logout", timeout=10, follow_redirects=False).headers["location"] == "/login"


def test_the_database_keeps_only_a_hash_of_the_session_id(server):
    with server.browser() as browser:
        cookie = server.sign_in(browser, "carol")
    from app.config import Settings

    settings = Settings(data_dir=server.data)
    sid = URLSafeTimedSerializer(settings.session_secret(), salt="sparsegpt-session").loads(cookie)["sid"]
    (row,) = [r for r in rows(server, "carol") if r.revoked_at is None]
    assert row.id == hashlib.sha256(sid.encode()).hexdigest() and sid not in row.id
    lifetime = row.expires_at - row.created_at
    assert abs(lifetime - timedelta(seconds=settings.session_max_age_s)) < timedelta(seconds=5)

    # A row that has expired admits nobody, although the cookie's signature is still young.
    with db.session_scope(server.database) as session:
        session.execute(
            update(WebSession).where(WebSession.id == row.id).values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert me(server, cookie).status_code == 401
    # Nor does a well-signed cookie whose session the server never made (or has forgotten).
    forged = URLSafeTimedSerializer(settings.session_secret(), salt="sparsegpt-session").dumps(
        {"sid": "x" * 43, "uid": row.user_id, "th": "0" * 32}
    )
    assert me(server, forged).status_code == 401


def test_signing_in_again_replaces_the_browsers_previous_session(server):
    with server.browser() as browser:
        first = server.sign_in(browser, "carol")
        second = server.sign_in(browser, "carol")
        assert first != second
        assert me(server, first).status_code == 401 and me(server, second).status_code == 200


def test_a_new_token_or_removing_the_user_ends_every_session(server):
    cookies = []
    for _ in range(2):  # two browsers
        with server.browser() as browser:
            cookies.append(server.sign_in(browser, "dave"))
    assert [me(server, c).status_code for c in cookies] == [200, 200]
    rotated = users_cli(server, "token", "dave")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert [me(server, c).status_code for c in cookies] == [401, 401]
    assert all(r.revoked_at is not None for r in rows(server, "dave"))

    server.tokens["dave"] = rotated.stdout.strip().splitlines()[-1]
    with server.browser() as browser:
        fresh = server.sign_in(browser, "dave")
    assert me(server, fresh).status_code == 200
    dave_id = rows(server, "dave")[0].user_id
    assert users_cli(server, "remove", "dave").returncode == 0
    assert me(server, fresh).status_code == 401
    assert [r for r in rows(server) if r.user_id == dave_id and r.revoked_at is None] == []
