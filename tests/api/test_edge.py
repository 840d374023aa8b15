"""The edge (app/guard.py, app/serve.py) against real servers over real HTTP, and Chromium for
what a page on another site can make a browser do:

- bodies: no body is read before sign-in is decided, and none past its cap (streamed or
  chunked): the API's memory stays flat under 300 MB bodies; 422s never echo input; NaN,
  Infinity, 1e999 and lone surrogates are a 422, never a 500
- Host: only the server's own names (DNS rebinding), allowed_hosts configurable
- cross-site requests: a page on another origin can neither queue, cancel nor upload, signed
  in (team mode) or not (single-user mode); the session cookie changes nothing on /api/*
- the session cookie is Secure behind a trusted TLS proxy only; security headers; a public
  /health that tells the status only
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.edge import PeakRSS, filler, framed, page_server, raw_request, server

MB = 1024 * 1024
BIG = 300 * MB
JOB = {"model": "facebook/opt-125m", "sparsity": 0.5}


@pytest.fixture(scope="module")
def team(module_redis, tmp_path_factory):
    """Team mode, behind a 'proxy' on 127.0.0.1 that is trusted, with an extra allowed name."""
    tmp = tmp_path_factory.mktemp("edge-team")
    with server(
        tmp,
        module_redis.url.replace("/0", "/1"),
        AUTH="required",
        FORWARDED_ALLOW_IPS="127.0.0.1",
        ALLOWED_HOSTS="sparse.example.org",
        MAX_UPLOAD_BYTES=str(64 * 1024),
    ) as s:
        yield s


@pytest.fixture(scope="module")
def single(module_redis, tmp_path_factory):
    """Single-user mode on loopback (no sign-in), no trusted proxy."""
    tmp = tmp_path_factory.mktemp("edge-single")
    with server(tmp, module_redis.url.replace("/0", "/2"), MAX_UPLOAD_BYTES=str(64 * 1024)) as s:
        yield s


def bearer(s) -> dict[str, str]:
    return {"Authorization": f"Bearer {s.token}"}


# --- 1. bodies: sign-in first, caps while streaming, 422s without echo --------------------------


def _head(method: str, path: str, port: int, *, length: int | None, extra: str = "") -> bytes:
    framing = f"content-length: {length}\r\n" if length is not None else "transfer-encoding: chunked\r\n"
    return (f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n{framing}{extra}\r\n").encode()


def test_big_bodies_are_refused_before_they_are_read(team):
    """300 MB to POST /api/v1/jobs without a token (declared and chunked) is a 401, with a token
    a 413; a 300 MB file sent as /login's token field a 413: each answered within seconds, and
    the API's memory grows by less than 100 MB through all of them."""
    port, boundary = team.port, "edgeboundary"
    json_head = "content-type: application/json\r\n"
    auth = f"authorization: Bearer {team.token}\r\n"
    multipart = f"content-type: multipart/form-data; boundary={boundary}\r\n"
    part = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="token"; filename="t.txt"\r\n'
        "content-type: text/plain\r\n\r\n"
    ).encode()
    closing = f"\r\n--{boundary}--\r\n".encode()
    cases = []
    for chunked in (False, True):
        length = None if chunked else BIG
        cases += [
            (
                "no token",
                401,
                _head("POST", "/api/v1/jobs", port, length=length, extra=json_head),
                lambda c=chunked: filler(BIG, chunked=c),
            ),
            (
                "token",
                413,
                _head("POST", "/api/v1/jobs", port, length=length, extra=json_head + auth),
                lambda c=chunked: filler(BIG, chunked=c),
            ),
            (
                "login file",
                413,
                _head(
                    "POST", "/login", port, length=None if chunked else len(part) + BIG + len(closing), extra=multipart
                ),
                lambda c=chunked: framed([part, *filler(BIG), closing], chunked=c),
            ),
        ]
    with PeakRSS(team.api.popen.pid) as rss:
        for name, status, head, body in cases:
            answer = raw_request(port, head, body(), timeout=60)
            assert answer.status == status, (name, head, answer)
            assert answer.seconds < 10, (name, answer.seconds)
            assert answer.sent < BIG, (name, "the server took the whole body", answer.sent)
    assert rss.growth_mb < 100, f"the API grew by {rss.growth_mb:.0f} MB"
    assert httpx.get(f"{team.base}/health", timeout=10).status_code == 200


def test_a_file_in_a_form_field_is_not_read_back(team):
    marker = b"SECRET-FILE-CONTENT-" * 2000
    response = httpx.post(f"{team.base}/login", files={"token": ("t.txt", marker)}, data={"next": "/"}, timeout=30)
    assert response.status_code == 422, response.text[:500]
    assert b"SECRET-FILE" not in response.content and len(response.content) < 2000
    assert all("input" not in e and "ctx" not in e for e in response.json()["detail"])


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "facebook/opt-125m", "sparsity": NaN}',
        b'{"model": "facebook/opt-125m", "sparsity": Infinity}',
        b'{"model": "facebook/opt-125m", "sparsity": -Infinity}',
        b'{"model": "facebook/opt-125m", "sparsity": 1e999}',
        b'{"model": "facebook/opt-125m", "sparsity": 0.5, "calibration": {"nsamples": 4, "seqlen": 1e999}}',
        b'{"model": "facebook/opt-125m", "sparsity": 0.5, "evaluation": {"max_windows": NaN}}',
        b'{"model": "facebook/opt-125m\\ud800", "sparsity": 0.5}',
        b'{"model": "facebook/opt-125m", "sparsity": 0.5, "calibration": {"dataset": "\\udfff"}}',
        b'{"model": "facebook/opt-125m\xed\xa0\x80", "sparsity": 0.5}',  # a surrogate in raw UTF-8 bytes
        b'{"\\ud800": 1, "model": "facebook/opt-125m", "sparsity": 0.5}',
    ],
    ids=[
        "nan",
        "inf",
        "-inf",
        "1e999",
        "seqlen-1e999",
        "windows-nan",
        "surrogate",
        "surrogate-nested",
        "raw-surrogate",
        "surrogate-key",
    ],
)
def test_json_that_is_not_json_numbers_or_unicode_is_422(team, body):
    for path in ("/api/v1/jobs", "/api/v1/jobs?idempotency_key=x"):
        response = httpx.post(
            team.base + path, content=body, headers={**bearer(team), "content-type": "application/json"}, timeout=30
        )
        assert response.status_code == 422, (response.status_code, response.text[:300])
        detail = response.json()["detail"]
        assert detail and all(set(e) == {"loc", "msg", "type"} for e in detail), detail
    jobs = httpx.get(f"{team.base}/api/v1/jobs", headers=bearer(team), timeout=10).json()
    assert all(job["model"] == JOB["model"] for job in jobs["items"])


def test_a_422_echoes_no_input(team):
    huge = "x" * 300_000  # 900 kB in all: under the 1 MB cap
    response = httpx.post(
        f"{team.base}/api/v1/jobs",
        json={"model": huge, "sparsity": huge, "method": huge},
        headers=bearer(team),
        timeout=30,
    )
    assert response.status_code == 422 and len(response.content) < 5000, len(response.content)
    assert all(set(e) == {"loc", "msg", "type"} for e in response.json()["detail"])


def test_json_over_the_body_cap_is_413_chunked_too(team):
    body = json.dumps({**JOB, "padding": "x" * (2 * MB)}).encode()
    declared = httpx.post(
        f"{team.base}/api/v1/jobs",
        content=body,
        headers={**bearer(team), "content-type": "application/json"},
        timeout=30,
    )
    assert declared.status_code == 413 and "limit" in declared.json()["detail"]
    chunked = raw_request(
        team.port,
        _head(
            "POST",
            "/api/v1/jobs",
            team.port,
            length=None,
            extra=f"content-type: application/json\r\nauthorization: Bearer {team.token}\r\n",
        ),
        framed([body[i : i + 65536] for i in range(0, len(body), 65536)], chunked=True),
    )
    assert chunked.status == 413


# --- 3. Host names ----------------------------------------------------------------------------


def test_the_host_header_must_name_this_server(team, single):
    for s in (team, single):
        for host in ("evil.example", f"evil.example:{s.port}", "127.0.0.1.evil.example", "localhost.evil.example"):
            response = httpx.get(f"{s.base}/api/v1/jobs", headers={"host": host, **bearer(s)}, timeout=10)
            assert response.status_code == 400 and response.text.startswith("Host not allowed"), (host, response.text)
            assert len(response.text) < 120
        for host in (f"127.0.0.1:{s.port}", f"localhost:{s.port}", "localhost", "LOCALHOST."):
            assert (
                httpx.get(f"{s.base}/api/v1/me", headers={"host": host, **bearer(s)}, timeout=10).status_code == 200
            ), host
    # The configured name is answered; the long bogus one is cut in the answer.
    assert (
        httpx.get(f"{team.base}/api/v1/me", headers={"host": "sparse.example.org", **bearer(team)}).status_code == 200
    )
    assert httpx.get(f"{single.base}/api/v1/me", headers={"host": "sparse.example.org"}).status_code == 400
    long = httpx.get(f"{team.base}/health", headers={"host": "a" * 5000 + ".example"})
    assert long.status_code == 400 and len(long.text) < 120


# --- 3 and 6. cross-site requests ------------------------------------------------------------------


def test_origin_rule_for_scripts_and_browsers(single, team):
    """Without a Bearer token a state change needs this server's own Origin (else Referer); with
    neither, no browser marks (a script); the session cookie is refused on /api/* changes."""
    url = f"{single.base}/api/v1/jobs"
    script = httpx.post(url, json=JOB, timeout=30)  # curl, a script: no Origin, no cookie
    assert script.status_code == 201, script.text
    job_id = script.json()["id"]
    same = httpx.post(url, json=JOB, headers={"origin": single.base}, timeout=30)
    assert same.status_code == 201, same.text
    refused = {
        "another origin": {"origin": "http://127.0.0.1:1"},
        "another site": {"origin": "https://evil.example"},
        "null origin": {"origin": "null"},
        "cross referer": {"referer": "http://evil.example/page"},
        "cross-site fetch": {"sec-fetch-site": "cross-site"},
        "same-site fetch": {"sec-fetch-site": "same-site"},
        "cookie without origin": {"cookie": "sparsegpt_session=abc"},
    }
    for name, headers in refused.items():
        for method, path in (
            ("POST", "/api/v1/jobs"),
            ("POST", f"/api/v1/jobs/{job_id}/cancel"),
            ("DELETE", f"/api/v1/jobs/{job_id}"),
            ("POST", "/jobs/new"),
            ("POST", "/logout"),
        ):
            response = httpx.request(method, single.base + path, json=JOB, headers=headers, timeout=30)
            assert response.status_code == 403, (name, method, path, response.status_code)
            assert "refused" in response.json()["detail"] or "pages" in response.json()["detail"]
    assert httpx.get(f"{single.base}/api/v1/jobs/{job_id}", timeout=10).json()["status"] == "queued"
    # A Bearer token is no ambient credential: its requests need no Origin.
    signed = httpx.post(f"{team.base}/api/v1/jobs", json=JOB, headers={**bearer(team), "origin": "http://evil.example"})
    assert signed.status_code == 201
    # Team mode: the dashboard's cookie reads /api/* but changes nothing there, same origin or not.
    login = httpx.post(f"{team.base}/login", data={"token": team.token, "next": "/"}, timeout=30)
    cookies = {"sparsegpt_session": login.cookies["sparsegpt_session"]}
    assert httpx.get(f"{team.base}/api/v1/me", cookies=cookies).status_code == 200
    for method, path in (
        ("POST", "/api/v1/jobs"),
        ("POST", f"/api/v1/jobs/{signed.json()['id']}/cancel"),
        ("DELETE", f"/api/v1/jobs/{signed.json()['id']}"),
    ):
        response = httpx.request(method, team.base + path, json=JOB, cookies=cookies, headers={"origin": team.base})
        assert response.status_code == 401 and "Bearer" in response.json()["detail"], (method, path, response.text)
    assert (
        httpx.get(f"{team.base}/api/v1/jobs/{signed.json()['id']}", headers=bearer(team)).json()["status"] == "queued"
    )


ATTACK = """<!doctype html><title>cute cats</title>
<iframe name="a"></iframe><iframe name="b"></iframe><iframe name="c"></iframe>
<form id="new" method="post" action="{api}/jobs/new" target="a">
  <input name="model" value="facebook/opt-125m"><input name="method" value="sparsegpt">
  <input name="sparsity" value="0.5"><input name="calibration_source" value="c4"><input name="nsamples" value="4">
</form>
<form id="cancel" method="post" action="{api}/jobs/{job}/cancel" target="b"></form>
<form id="upload" method="post" action="{api}/api/v1/calibration-sets" enctype="multipart/form-data" target="c">
  <input type="file" name="file">
</form>
<script>
  const file = new File(["some calibration text from another site"], "evil.txt", {{type: "text/plain"}});
  const dt = new DataTransfer(); dt.items.add(file);
  document.querySelector("#upload input").files = dt.files;
  for (const id of ["new", "cancel", "upload"]) document.getElementById(id).submit();
  const body = new FormData(); body.append("file", file);
  window.fetched = Promise.all([
    fetch("{api}/api/v1/calibration-sets", {{method: "POST", mode: "no-cors", credentials: "include", body}}),
    fetch("{api}/jobs/new", {{method: "POST", mode: "no-cors", credentials: "include",
                             body: new URLSearchParams({{model: "facebook/opt-125m", sparsity: "0.5"}})}}),
    fetch("{api}/api/v1/jobs", {{method: "POST", mode: "no-cors", credentials: "include",
                                body: JSON.stringify({{model: "facebook/opt-125m", sparsity: 0.5}})}}),
  ]).then(() => "sent", (e) => String(e));
</script>"""


@pytest.fixture(scope="module")
def edge_browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    # evil.example resolves to this machine: what a rebinding DNS name does.
    args = [
        *CHROMIUM_ARGS,
        "--host-resolver-rules=MAP evil.example 127.0.0.1",
        "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        yield browser
        browser.close()


def _attack(browser, s, headers: dict[str, str], cookies: list[dict] | None = None) -> list[tuple[str, int]]:
    """A page on another origin posts three forms and three fetches to ``s``; returns the
    (method path, status) of every request that reached ``s``, and checks nothing changed."""
    before = httpx.get(f"{s.base}/api/v1/jobs", headers=headers, timeout=10).json()["total"]
    job = httpx.post(f"{s.base}/api/v1/jobs", json=JOB, headers=headers, timeout=30).json()["id"]
    context = browser.new_context()
    if cookies:
        context.add_cookies(cookies)
    page = context.new_page()
    seen: list[tuple[str, int]] = []
    page.on(
        "response",
        lambda r: (
            seen.append((f"{r.request.method} {r.url[len(s.base) :]}", r.status)) if r.url.startswith(s.base) else None
        ),
    )
    try:
        with page_server({"/": ATTACK.format(api=s.base, job=job)}) as evil:
            page.goto(evil + "/")
            assert page.evaluate("window.fetched") == "sent"
            deadline = time.monotonic() + 20
            while sum(1 for r, _ in seen if r.startswith("POST")) < 6 and time.monotonic() < deadline:
                page.wait_for_timeout(100)
    finally:
        context.close()
    jobs = httpx.get(f"{s.base}/api/v1/jobs", headers=headers, timeout=10).json()
    assert jobs["total"] == before + 1, f"a job was created from another site: {jobs['items'][:2]}"
    assert httpx.get(f"{s.base}/api/v1/jobs/{job}", headers=headers).json()["status"] == "queued", (
        "cancelled from another site"
    )
    uploads = httpx.get(f"{s.base}/api/v1/calibration-sets", headers=headers).json()["items"]
    assert not any(u["name"] == "evil.txt" for u in uploads), "uploaded from another site"
    return seen


def test_another_site_cannot_drive_single_user_mode(edge_browser, single):
    seen = _attack(edge_browser, single, {})
    posts = [(r, status) for r, status in seen if r.startswith("POST")]
    assert len(posts) == 6 and all(status == 403 for _, status in posts), seen


def test_another_site_cannot_drive_a_signed_in_browser(edge_browser, team):
    login = httpx.post(f"{team.base}/login", data={"token": team.token, "next": "/"}, timeout=30)
    cookie = {"name": "sparsegpt_session", "value": login.cookies["sparsegpt_session"], "url": team.base}
    seen = _attack(edge_browser, team, bearer(team), [cookie])
    posts = [(r, status) for r, status in seen if r.startswith("POST")]
    assert len(posts) == 6 and all(status in (401, 403) for _, status in posts), seen


def test_dns_rebinding_reads_nothing(edge_browser, single):
    """A page whose name now resolves to this server (evil.example -> 127.0.0.1) is refused."""
    context = edge_browser.new_context()
    page = context.new_page()
    try:
        for path in ("/", "/api/v1/jobs", "/health"):
            response = page.goto(f"http://evil.example:{single.port}{path}")
            assert response.status == 400 and "Host not allowed" in page.content(), path
    finally:
        context.close()


# --- 13. the session cookie behind a TLS proxy ---------------------------------------------------


def test_session_cookie_is_secure_behind_a_trusted_proxy(team, single):
    for s, secure in ((team, True), (single, False)):
        login = httpx.post(
            f"{s.base}/login",
            data={"token": s.token, "next": "/"},
            headers={"x-forwarded-proto": "https", "x-forwarded-for": "203.0.113.7"},
            timeout=30,
        )
        assert login.status_code == 303, login.text[:300]
        flags = [f.strip().lower() for f in login.headers["set-cookie"].split(";")]
        assert ("secure" in flags) is secure, (s.base, login.headers["set-cookie"])
        plain = httpx.post(f"{s.base}/login", data={"token": s.token, "next": "/"}, timeout=30)
        assert "secure" not in [f.strip().lower() for f in plain.headers["set-cookie"].split(";")]


# --- 14. security headers ----------------------------------------------------------------------------


def test_security_headers_on_every_response(team):
    login = httpx.post(f"{team.base}/login", data={"token": team.token, "next": "/"}, timeout=30)
    cookies = {"sparsegpt_session": login.cookies["sparsegpt_session"]}
    responses = {
        "login page": httpx.get(f"{team.base}/login"),
        "jobs page": httpx.get(f"{team.base}/", cookies=cookies),
        "new job page": httpx.get(f"{team.base}/jobs/new", cookies=cookies),
        "me": httpx.get(f"{team.base}/api/v1/me", headers=bearer(team)),
        "jobs": httpx.get(f"{team.base}/api/v1/jobs", headers=bearer(team)),
        "401": httpx.get(f"{team.base}/api/v1/me"),
        "redirect": httpx.get(f"{team.base}/"),
        "sign-in": login,
        "404": httpx.get(f"{team.base}/api/v1/jobs/999999", headers=bearer(team)),
        "static": httpx.get(f"{team.base}/static/dashboard.js"),
    }
    for name, r in responses.items():
        assert r.headers.get("x-frame-options") == "DENY", name
        assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), name
        assert r.headers.get("x-content-type-options") == "nosniff", name
        assert r.headers.get("referrer-policy") == "same-origin", name
        if name != "static":
            assert "no-store" in r.headers.get("cache-control", ""), name
    assert responses["jobs page"].status_code == 200 and "text/html" in responses["jobs page"].headers["content-type"]
    assert "no-store" not in responses["static"].headers.get("cache-control", "")


# --- 17. /health ------------------------------------------------------------------------------------


def test_public_health_tells_the_status_only(team):
    public = httpx.get(f"{team.base}/health", timeout=10)
    assert public.status_code == 200 and public.json() == {"status": "degraded"}  # no worker here
    detailed = httpx.get(f"{team.base}/health", headers=bearer(team), timeout=10).json()
    assert detailed["database"]["ok"] and detailed["redis"]["ok"] and detailed["workers"] == []
    assert httpx.get(f"{team.base}/api/v1/health", timeout=10).status_code == 401
    assert httpx.get(f"{team.base}/api/v1/health", headers=bearer(team), timeout=10).json()["status"] == "degraded"
