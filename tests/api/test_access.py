"""Accounts, ownership, limits, idempotency and bad input, in-process on PostgreSQL with a Redis
of its own (jobs go to a queue no worker consumes)."""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.routing import APIRoute

from app import archive, crud, db
from app.models import Job, utcnow
from tests.support.stacks import InProcess, job_body, make_inprocess


@pytest.fixture(scope="module")
def env(team_pg, module_redis, models_dir, tmp_path_factory):
    client, settings, tokens = make_inprocess(team_pg, module_redis, models_dir, tmp_path_factory)
    with client:
        yield InProcess(client, settings, tokens)


def post_job(env: InProcess, who: str, body: dict | None = None, **headers):
    return env.client.post(
        "/api/v1/jobs",
        json=body or {"model": "facebook/opt-125m", "sparsity": 0.5},
        headers={**env.as_(who), **headers},
    )


def cancel_all(env: InProcess) -> None:
    with db.session_scope(env.settings.database) as session:
        items, _ = crud.list_job_summaries(session, status="queued", limit=200)
        for job in items:
            crud.request_cancel(session, job_id=job["id"])


def finished_job_with_artifact(env: InProcess, who: str, tmp: Path) -> int:
    """A job of ``who`` that succeeded, with a real artifact directory where the worker puts it."""
    job_id = post_job(env, who).json()["id"]
    with db.session_scope(env.settings.database) as session:
        assert crud.claim_job(
            session, job_id=job_id, worker="w@h", pid=1, stale_before=crud.stale_before(60), max_attempts=2
        ).claimed
    final = env.settings.artifacts_dir / str(job_id) / "attempt-1"
    final.mkdir(parents=True)
    (final / "config.json").write_text('{"model_type": "llama"}')
    (final / "model.safetensors").write_bytes(secrets.token_bytes(4096))
    size, sha = archive.digest(final, archive.artifact_name(job_id))
    with db.session_scope(env.settings.database) as session:
        assert crud.finish_job(session, job_id=job_id, attempt=1, status="succeeded", artifact=(str(final), size, sha))
    return job_id


# --- tokens and sessions ------------------------------------------------------------------------


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def api_routes(app) -> list[tuple[str, set[str]]]:
    """(path, methods) of every FastAPI route, including those of included routers."""
    try:
        from fastapi.routing import iter_route_contexts  # FastAPI >= 0.16x wraps included routers
    except ImportError:
        return [(r.path, set(r.methods)) for r in app.routes if isinstance(r, APIRoute)]
    return [
        (c.path, set(c.methods))
        for c in iter_route_contexts(app.routes)
        if isinstance(getattr(c, "route", None), APIRoute)
    ]


def test_every_route_needs_a_token(env):
    """A token-less request to every route: 401 (API, with WWW-Authenticate) or a redirect to
    /login (dashboard pages); only /health, /login, /logout, static files and the docs are open."""
    open_paths = {"/health", "/login", "/logout", "/docs", "/docs/oauth2-redirect", "/redoc"}  # docs: app routes
    checked = 0
    for route_path, methods in api_routes(env.client.app):
        for method in sorted(methods - {"HEAD"}):
            path = _concrete(route_path)
            response = env.client.request(method, path)
            if route_path in open_paths:
                assert response.status_code < 400 or response.status_code == 401 and method == "POST", (method, path)
                continue
            checked += 1
            if path.startswith("/api/") or method != "GET":
                assert response.status_code == 401, (method, path, response.status_code, response.text[:200])
                assert response.headers["www-authenticate"].startswith("Bearer"), (method, path)
            else:
                assert response.status_code == 303, (method, path, response.status_code)
                assert response.headers["location"].startswith("/login?next="), (method, path)
    assert checked >= 12
    assert env.client.get("/health").status_code == 200
    assert env.client.get("/openapi.json").status_code == 200 and env.client.get("/docs").status_code == 200
    assert env.client.get("/static/dashboard.js").status_code == 200
    assert env.client.get("/api/v1/health").status_code == 401


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer ", "Basic YWxpY2U6eA==", "Bearer sgpt_not-a-real-token", "Token x", "Bearer " + "x" * 5000],
)
def test_bad_credentials_are_401(env, header):
    response = env.client.get("/api/v1/jobs", headers={"Authorization": header})
    assert response.status_code == 401 and "detail" in response.json()


def test_token_identifies_the_user(env):
    me = env.client.get("/api/v1/me", headers=env.as_("alice")).json()
    assert me["name"].startswith("alice") and me["is_admin"] is False and me["local"] is False
    assert env.client.get("/api/v1/me", headers=env.as_("root")).json()["is_admin"] is True


def test_only_the_hash_is_stored(env):
    with db.session_scope(env.settings.database) as session:
        hashes = {u.token_hash for u in crud.list_users(session)}
    for token in env.tokens.values():
        assert token not in hashes and hashlib.sha256(token.encode()).hexdigest() in hashes


def test_dashboard_session_login_logout(env):
    c = env.client
    assert c.get("/", headers={"accept": "text/html"}).headers["location"] == "/login?next=/"
    bad = c.post("/login", data={"token": "sgpt_wrong", "next": "/"})
    assert bad.status_code == 401 and "not valid" in bad.text and "sparsegpt_session" not in bad.cookies
    ok = c.post("/login", data={"token": env.tokens["bob"], "next": "/jobs/new"})
    assert ok.status_code == 303 and ok.headers["location"] == "/jobs/new"
    cookie = ok.cookies["sparsegpt_session"]
    set_cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=lax" in set_cookie
    assert env.tokens["bob"] not in cookie
    c.cookies.clear()
    c.cookies.set("sparsegpt_session", cookie)
    assert c.get("/api/v1/me").json()["name"].startswith("bob")
    assert c.get("/").status_code == 200
    # A forged or altered cookie is nobody.
    c.cookies.set("sparsegpt_session", cookie[:-3] + ("AAA" if not cookie.endswith("AAA") else "BBB"))
    assert c.get("/api/v1/me").status_code == 401
    c.cookies.set("sparsegpt_session", cookie)
    assert c.get("/logout").status_code == 200  # a page with the logout button: a GET ends nothing
    assert c.get("/api/v1/me").status_code == 200
    token = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', c.get("/").text).group(1)
    own = {"Origin": "http://testserver"}  # from the dashboard's own page
    assert c.post("/logout", headers=own).status_code == 403  # logging out is a form: it needs its token
    out = c.post("/logout", data={"csrf_token": token}, headers=own)
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert 'sparsegpt_session=""' in out.headers["set-cookie"] or "max-age=0" in out.headers["set-cookie"].lower()
    c.cookies.set("sparsegpt_session", cookie)
    assert c.get("/api/v1/me").status_code == 401  # the session ended on the server
    c.cookies.clear()


@pytest.mark.parametrize(
    "target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"]
)
def test_login_never_redirects_off_site(env, target):
    response = env.client.post("/login", data={"token": env.tokens["bob"], "next": target})
    assert response.status_code == 303 and response.headers["location"] == "/"
    env.client.cookies.clear()


def test_secret_is_generated_once_in_the_data_dir(env):
    secret = env.settings.data_dir / "secret_key"
    assert secret.is_file() and (secret.stat().st_mode & 0o077) == 0
    assert env.settings.session_secret() == secret.read_text().strip()


# --- ownership ------------------------------------------------------------------------------------


def test_other_users_job(env, tmp_path):
    """Bob reads and downloads Alice's job; he may not cancel, retry or delete it; an admin may."""
    job_id = finished_job_with_artifact(env, "alice", tmp_path)
    c = env.client
    assert c.get(f"/api/v1/jobs/{job_id}", headers=env.as_("bob")).status_code == 200
    listed = c.get("/api/v1/jobs", headers=env.as_("bob")).json()["items"]
    assert any(j["id"] == job_id and j["owner"].startswith("alice") for j in listed)
    download = c.get(f"/api/v1/jobs/{job_id}/artifact", headers=env.as_("bob"))
    assert (
        download.status_code == 200
        and hashlib.sha256(download.content).hexdigest() == download.headers["x-checksum-sha256"]
    )
    for method, path in (("POST", "cancel"), ("POST", "retry"), ("DELETE", "")):
        response = c.request(method, f"/api/v1/jobs/{job_id}/{path}".rstrip("/"), headers=env.as_("bob"))
        assert response.status_code == 403, (method, path, response.text)
        assert "only its owner or an admin" in response.json()["detail"]
    queued = post_job(env, "alice").json()["id"]
    assert c.post(f"/api/v1/jobs/{queued}/cancel", headers=env.as_("bob")).status_code == 403
    assert c.get(f"/api/v1/jobs/{queued}", headers=env.as_("bob")).json()["status"] == "queued"
    # The owner retries; the admin cancels and deletes.
    retried = c.post(f"/api/v1/jobs/{job_id}/retry", headers=env.as_("alice"))
    assert retried.status_code == 201 and retried.json()["retry_of"] == job_id and retried.json()["id"] != job_id
    assert retried.json()["spec"] == c.get(f"/api/v1/jobs/{job_id}", headers=env.as_("alice")).json()["spec"]
    assert c.post(f"/api/v1/jobs/{retried.json()['id']}/retry", headers=env.as_("alice")).status_code == 409
    assert c.post(f"/api/v1/jobs/{queued}/cancel", headers=env.as_("root")).status_code == 200
    assert c.post(f"/api/v1/jobs/{retried.json()['id']}/cancel", headers=env.as_("root")).status_code == 200
    assert c.delete(f"/api/v1/jobs/{job_id}", headers=env.as_("root")).status_code == 204
    assert not (env.settings.artifacts_dir / str(job_id)).exists()
    assert c.get(f"/api/v1/jobs/{job_id}", headers=env.as_("alice")).status_code == 404
    assert c.delete(f"/api/v1/jobs/{job_id}", headers=env.as_("root")).status_code == 404


def test_running_job_must_be_cancelled_before_delete(env):
    job_id = post_job(env, "alice").json()["id"]
    with db.session_scope(env.settings.database) as session:
        crud.claim_job(session, job_id=job_id, worker="w@h", pid=1, stale_before=crud.stale_before(60), max_attempts=2)
    response = env.client.delete(f"/api/v1/jobs/{job_id}", headers=env.as_("alice"))
    assert response.status_code == 409 and "cancel it first" in response.json()["detail"]
    assert env.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=env.as_("alice")).status_code == 202
    with db.session_scope(env.settings.database) as session:
        crud.finish_job(session, job_id=job_id, attempt=1, status="cancelled", error="cancelled while running")
    assert env.client.delete(f"/api/v1/jobs/{job_id}", headers=env.as_("alice")).status_code == 204


# --- limits -------------------------------------------------------------------------------------------


def test_per_user_cap_holds_under_concurrency(env):
    """Twelve simultaneous submissions by one user with a cap of 3: exactly 3 are queued, the
    others get 429 with the reason; another user is not affected."""
    cancel_all(env)
    codes: list[int] = []
    details: list[str] = []
    lock = threading.Lock()

    def submit():
        response = post_job(env, "bob")
        with lock:
            codes.append(response.status_code)
            if response.status_code == 429:
                details.append(response.json()["detail"])

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201] * 3 + [429] * 9, codes
    assert all("limit per user is 3" in d for d in details)
    assert post_job(env, "alice").status_code == 201
    usage = env.client.get("/api/v1/usage", headers=env.as_("bob")).json()
    assert usage["you"]["active_jobs"] == 3 and usage["max_active_jobs_per_user"] == 3
    cancel_all(env)
    assert post_job(env, "bob").status_code == 201
    cancel_all(env)


def test_sample_and_length_caps(env, models_dir):
    too_many = job_body(models_dir, calibration={"dataset": "c4", "nsamples": 257})
    response = env.client.post("/api/v1/jobs", json=too_many, headers=env.as_("alice"))
    assert response.status_code == 422 and "limit of 256" in str(response.json())
    too_long = job_body(models_dir, calibration={"dataset": "c4", "seqlen": 1025})
    response = env.client.post("/api/v1/jobs", json=too_long, headers=env.as_("alice"))
    assert response.status_code == 422 and "limit of 1024" in str(response.json())


def test_upload_cap(env):
    limit = env.settings.max_upload_bytes
    response = env.client.post(
        "/api/v1/calibration-sets", files={"file": ("big.txt", b"a " * limit)}, headers=env.as_("alice")
    )
    assert response.status_code == 413


def test_retention_sweep_and_usage(env, tmp_path):
    from app.sweeper import sweep_once

    job_id = finished_job_with_artifact(env, "alice", tmp_path)
    usage = env.client.get("/api/v1/usage", headers=env.as_("alice")).json()
    assert usage["artifacts_bytes"] >= 4096 and usage["disk"]["free_bytes"] > 0 and usage["artifact_retention_s"] > 0
    job = env.client.get(f"/api/v1/jobs/{job_id}", headers=env.as_("alice")).json()
    assert job["artifact"]["expires_at"] is not None
    with db.session_scope(env.settings.database) as session:  # it ended long ago
        session.get(Job, job_id).finished_at = utcnow() - timedelta(seconds=env.settings.artifact_retention_s + 60)
    report = sweep_once(env.settings, env.client.app.state.sessions, env.client.app.state.redis)
    assert job_id in report.expired
    assert not (env.settings.artifacts_dir / str(job_id)).exists()
    job = env.client.get(f"/api/v1/jobs/{job_id}", headers=env.as_("alice")).json()
    assert job["artifact"] is None and job["artifact_expired_at"] is not None and job["status"] == "succeeded"
    gone = env.client.get(f"/api/v1/jobs/{job_id}/artifact", headers=env.as_("alice"))
    assert gone.status_code == 410 and "deleted" in gone.json()["detail"]
    assert job_id not in sweep_once(env.settings, env.client.app.state.sessions, env.client.app.state.redis).expired


# --- Idempotency-Key ------------------------------------------------------------------------------------


def test_idempotency_key(env):
    cancel_all(env)
    key = secrets.token_hex(8)
    first = post_job(env, "alice", {"model": "facebook/opt-125m", "sparsity": 0.5}, **{"Idempotency-Key": key})
    assert first.status_code == 201
    # The same body (other key order, defaults spelled out): the first job, 200.
    again = post_job(
        env,
        "alice",
        {"sparsity": "50%", "method": "sparsegpt", "model": "facebook/opt-125m"},
        **{"Idempotency-Key": key},
    )
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == f"/api/v1/jobs/{first.json()['id']}"
    other = post_job(env, "alice", {"model": "facebook/opt-125m", "sparsity": 0.6}, **{"Idempotency-Key": key})
    assert other.status_code == 422 and "different body" in other.json()["detail"]
    # Keys are per user: Bob's same key is his own job.
    bobs = post_job(env, "bob", {"model": "facebook/opt-125m", "sparsity": 0.5}, **{"Idempotency-Key": key})
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"]
    for bad in ("bad key", "x" * 256, "tab\there"):
        response = post_job(env, "alice", None, **{"Idempotency-Key": bad})
        assert response.status_code == 422, (bad, response.text)
    cancel_all(env)


def test_idempotency_key_concurrent_twins(env):
    cancel_all(env)
    key = secrets.token_hex(8)
    results = []

    def submit():
        results.append(
            post_job(env, "alice", {"model": "facebook/opt-125m", "sparsity": 0.5}, **{"Idempotency-Key": key})
        )

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # One twin makes the job; the others replay it (200), or get 409 + Retry-After while the first is
    # still sending its run message: asked again, they replay the same job.
    codes = sorted(r.status_code for r in results)
    assert codes.count(201) == 1 and set(codes) <= {200, 201, 409}, codes
    assert all(r.headers.get("retry-after") for r in results if r.status_code == 409)
    again = [
        post_job(env, "alice", {"model": "facebook/opt-125m", "sparsity": 0.5}, **{"Idempotency-Key": key})
        for r in results
        if r.status_code == 409
    ]
    assert all(r.status_code == 200 for r in again)
    assert len({r.json()["id"] for r in results + again if r.status_code in (200, 201)}) == 1
    cancel_all(env)


# --- bad input ---------------------------------------------------------------------------------------------


def test_trust_remote_code_refused_unless_allowed(env, team_pg, module_redis, models_dir, tmp_path_factory):
    body = {"model": "facebook/opt-125m", "sparsity": 0.5, "trust_remote_code": True}
    response = post_job(env, "alice", body)
    assert response.status_code == 422 and "trust_remote_code is refused" in str(response.json())
    client, _, tokens = make_inprocess(
        team_pg, module_redis, models_dir, tmp_path_factory, allow_trust_remote_code=True
    )
    with client:
        allowed = client.post("/api/v1/jobs", json=body, headers={"Authorization": f"Bearer {tokens['alice']}"})
        assert allowed.status_code == 201 and allowed.json()["spec"]["trust_remote_code"] is True
        client.post(
            f"/api/v1/jobs/{allowed.json()['id']}/cancel", headers={"Authorization": f"Bearer {tokens['alice']}"}
        )


TRAVERSALS = [
    "../../../../etc/passwd",
    "..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e/%2e%2e/etc/passwd",
    "....//....//etc/passwd",
]


@pytest.mark.parametrize("attempt", TRAVERSALS)
def test_path_traversal_on_every_route_with_a_name(env, models_dir, tmp_path, attempt):
    """Job ids, static files, upload file names, model and dataset paths, the login target."""
    c, h = env.client, env.as_("alice")
    for path in (
        f"/api/v1/jobs/{attempt}",
        f"/api/v1/jobs/{attempt}/artifact",
        f"/api/v1/jobs/{attempt}/events",
        f"/api/v1/jobs/1/{attempt}",
        f"/jobs/{attempt}",
    ):
        response = c.get(path, headers=h)
        assert response.status_code in (404, 422), (path, response.status_code)
        assert "root:" not in response.text
    for method in ("POST", "DELETE"):
        for path in (f"/api/v1/jobs/{attempt}/cancel", f"/api/v1/jobs/{attempt}/retry", f"/api/v1/jobs/{attempt}"):
            assert c.request(method, path, headers=h).status_code in (404, 405, 422), (method, path)
    static = c.get(f"/static/{attempt}")
    assert static.status_code == 404 and "root:" not in static.text
    # An upload's name never becomes its path.
    upload = c.post("/api/v1/calibration-sets", files={"file": (attempt + ".txt", b"some text")}, headers=h)
    assert upload.status_code == 201, upload.text
    name = upload.json()["name"]  # a label only: no separators, not hidden
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    with db.session_scope(env.settings.database) as session:
        stored = Path(crud.get_calibration_set(session, upload.json()["id"]).path)
    assert stored.parent == env.settings.uploads_dir and stored.name == f"{upload.json()['sha256']}.txt"
    # Model and dataset paths: only under the allowed directories, symlinks resolved.
    escape = models_dir / f"escape-{secrets.token_hex(3)}"
    escape.symlink_to("/etc")
    for body in (
        job_body(models_dir, model=attempt),
        {**job_body(models_dir), "model": str(models_dir) + "/" + attempt},
        {**job_body(models_dir), "model": str(escape)},
        {**job_body(models_dir), "calibration": {"dataset": str(models_dir) + "/" + attempt, "nsamples": 4}},
        {**job_body(models_dir), "calibration": {"dataset": str(escape / "passwd"), "nsamples": 4}},
        {**job_body(models_dir), "evaluation": {"datasets": [str(models_dir) + "/../../etc/hostname"]}},
    ):
        response = c.post("/api/v1/jobs", json=body, headers=h)
        assert response.status_code == 422, (body, response.text)
    # The artifact's place is the worker's: no field of the spec names it.
    extra = c.post("/api/v1/jobs", json={**job_body(models_dir), "output": "/tmp/x"}, headers=h)
    assert extra.status_code == 422 and "Extra inputs are not permitted" in extra.text
    assert c.post("/login", data={"token": env.tokens["alice"], "next": attempt}).headers["location"] == "/"
    c.cookies.clear()


def test_artifact_path_outside_the_artifacts_dir_is_never_served(env, tmp_path):
    """Even if a row named another directory (it never comes from input), it is not streamed."""
    job_id = finished_job_with_artifact(env, "alice", tmp_path)
    with db.session_scope(env.settings.database) as session:
        session.get(Job, job_id).artifact_path = "/etc"
        for row in session.get(Job, job_id).artifacts:  # the artifact rows, which the download reads
            row.path = "/etc"
    response = env.client.get(f"/api/v1/jobs/{job_id}/artifact", headers=env.as_("alice"))
    assert response.status_code == 410 and "root:" not in response.text


def test_browser_form_post_without_session_goes_to_login(env):
    response = env.client.post("/jobs/1/cancel", headers={"accept": "text/html,application/xhtml+xml"})
    assert response.status_code == 303 and response.headers["location"] == "/login?next=/jobs/1/cancel"
    api = env.client.post("/api/v1/jobs/1/cancel", headers={"accept": "text/html"})
    assert api.status_code == 401


def test_progress_reporter_does_not_wait_on_a_dead_redis(module_redis):
    """Redis hanging (a socket that never answers): the engine's progress and cancel-flag calls
    do not wait on it each time (they back off), and publishing resumes once Redis is back."""
    import socket
    import time

    import redis as redis_lib
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from worker.reporter import RedisProgress

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(128)  # accepts connections (the kernel does), never answers
    dead = redis_lib.Redis(
        port=hung.getsockname()[1],
        socket_timeout=0.25,
        socket_connect_timeout=0.25,
        retry=Retry(NoBackoff(), 1),
        decode_responses=True,
    )
    reporter = RedisProgress(dead, 999_001, 1, maxlen=100, ttl_s=60, backoff_s=30)
    start = time.monotonic()
    for i in range(200):  # without the backoff: 400 calls x 2 tries x 0.25 s
        reporter.progress({"stage": "pruning", "layer": i})
        assert reporter.cancel_flag() is False
    assert time.monotonic() - start < 3.0 and reporter.dropped == 200
    hung.close()
    reporter.backoff_s = 0.3
    reporter._down_until = time.monotonic() + 0.3
    assert reporter.snapshot()["layer"] == 199, "the latest state is kept for the database heartbeat"
    live = redis_lib.Redis.from_url(module_redis.url, decode_responses=True)
    reporter.client = live
    time.sleep(0.35)
    reporter.progress({"stage": "pruning", "layer": 200})
    assert live.xlen("sparsegpt:job:999001:events") == 1


def test_cap_and_idempotency_hold_on_sqlite(module_redis, models_dir, tmp_path_factory):
    """The same rules on the embedded default database (its write lock serializes a user's submissions)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite-team') / 'sparsegpt.db'}"
    client, _, tokens = make_inprocess(url, module_redis, models_dir, tmp_path_factory)
    headers = {"Authorization": f"Bearer {tokens['alice']}"}
    with client:
        codes: list[int] = []

        def submit(extra: dict) -> None:
            codes.append(
                client.post(
                    "/api/v1/jobs", json={"model": "facebook/opt-125m", "sparsity": 0.5}, headers={**headers, **extra}
                ).status_code
            )

        threads = [threading.Thread(target=submit, args=({},)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [201] * 3 + [429] * 5
        for job in client.get("/api/v1/jobs", headers=headers).json()["items"]:
            client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=headers)
        codes.clear()
        threads = [threading.Thread(target=submit, args=({"Idempotency-Key": "same"},)) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes.count(201) == 1 and set(codes) <= {200, 201, 409}, codes  # 409: the first is still sending
        again = client.post(
            "/api/v1/jobs",
            json={"model": "facebook/opt-125m", "sparsity": 0.5},
            headers={**headers, "Idempotency-Key": "same"},
        )
        assert again.status_code == 200
        assert client.get("/api/v1/jobs", headers=headers).json()["total"] == 4  # 3 cancelled + this one


@pytest.mark.timeout(60)
def test_event_stream_ends_when_its_job_is_deleted(env):
    import time

    job_id = post_job(env, "alice").json()["id"]
    env.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=env.as_("alice"))
    with db.session_scope(env.settings.database) as session:  # back to queued: a stream that would stay open
        session.get(Job, job_id).status = "queued"
    timer = threading.Timer(0.5, lambda: env.client.delete(f"/api/v1/jobs/{job_id}", headers=env.as_("alice")))
    start = time.monotonic()
    timer.start()
    with env.client.stream("GET", f"/api/v1/jobs/{job_id}/events", headers=env.as_("alice")) as stream:
        body = stream.read().decode()
    timer.join()
    assert "event: snapshot" in body and time.monotonic() - start < 20
    assert env.client.get(f"/api/v1/jobs/{job_id}/events", headers=env.as_("alice")).status_code == 404
