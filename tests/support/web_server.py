"""A real API process for the dashboard's session and CSRF tests (``sparsegpt serve --workers 0``
on SQLite, with users made by the CLI), a browser-like HTTP client, and a page served from
another port of the same host (the attacker's site in the cross-site cases)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.edge import page_server
from tests.support.processes import Proc, add_user, base_env, free_port, serve_api

_TOKEN = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')


def find_token(html: str) -> str | None:
    """The CSRF token of the first form on a page, if it has one."""
    found = _TOKEN.search(html)
    return found.group(1) if found else None


def form_token(html: str) -> str:
    """The CSRF token of the first form on a page (which must have one)."""
    token = find_token(html)
    assert token, f"no csrf_token field on the page: {html[:500]}"
    return token


@dataclass
class WebServer:
    base: str
    env: dict[str, str]
    api: Proc
    data: Path
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def database(self) -> str:
        return f"sqlite:///{self.data / 'sparsegpt.db'}"

    def browser(self, **kwargs) -> httpx.Client:
        """A client that acts like a browser on the dashboard's own pages: it keeps cookies and
        sends this server as its Origin (a same-origin form post); no token is added for it."""
        kwargs.setdefault("timeout", 20)
        return httpx.Client(base_url=self.base, headers={"Origin": self.base, "Accept": "text/html"}, **kwargs)

    def sign_in(self, client: httpx.Client, name: str) -> str:
        """Through the sign-in form (its token and cookie); returns the session cookie."""
        page = client.get("/login")
        assert page.status_code == 200, page.text[-1000:]
        # (test_csrf checks that the form has a token)
        fields = {"token": self.tokens[name], "next": "/", "csrf_token": find_token(page.text) or ""}
        done = client.post("/login", data=fields)
        assert done.status_code == 303, done.text[-1000:]
        return done.cookies["sparsegpt_session"]

    def queued_job(self, owner: str) -> int:
        """A queued job row of ``owner`` (made in the database: no queue or worker involved)."""
        from app import crud, db

        with db.session_scope(self.database) as session:
            user = crud.get_user_by_name(session, owner)
            job = crud.create_job(
                session, spec={"model": "org/name", "method": "wanda", "sparsity": "2:4"}, owner_id=user.id
            )
            return job.id

    def job_status(self, job_id: int) -> str:
        from app import crud, db

        with db.session_scope(self.database) as session:
            return crud.get_job(session, job_id).status

    def job_count(self) -> int:
        from app import crud, db

        with db.session_scope(self.database) as session:
            return sum(crud.status_counts(session).values())


@contextmanager
def web_server(
    tmp_path: Path, redis_url: str, *, auth: str = "required", users: tuple[str, ...] = ("alice", "bob")
) -> Iterator[WebServer]:
    data = tmp_path / "data"
    env = base_env(
        SPARSEGPT_DATA_DIR=str(data), REDIS_URL=redis_url, SPARSEGPT_AUTH=auth, SPARSEGPT_QUEUE=f"web-{free_port()}"
    )  # a queue no worker reads
    tokens = {name: add_user(env, name) for name in users}
    with serve_api(env, tmp_path / "api.log") as (base, _port, api):
        yield WebServer(base, env, api, data, tokens)


@contextmanager
def other_site(html: str) -> Iterator[str]:
    """Serves ``html`` at / from another port of this host (same site, another origin); yields
    its URL."""
    with page_server({"/": html}) as base:
        yield base + "/"


def auto_submit(action: str, fields: dict[str, str], *, enctype: str = "application/x-www-form-urlencoded") -> str:
    """An attacker's page: a form that posts itself to ``action`` as soon as it loads."""
    inputs = "".join(f'<input type="hidden" name="{k}" value="{v}">' for k, v in fields.items())
    return (
        f'<!doctype html><html><body><form id="f" method="post" action="{action}" enctype="{enctype}">{inputs}'
        '</form><script>document.getElementById("f").submit()</script></body></html>'
    )
