"""The compose deployment's reverse proxy (issue 11, item 2; item 13 behind it): the nginx binary
run with deploy/nginx as docker-compose.yml configures it (tests/support/proxy.py renders the
same templates with the same values; only ports, upstream and the limits a test shortens differ),
in front of a real ``sparsegpt serve --workers 0``. Plus cheap checks of docker-compose.yml
itself: only the proxy publishes ports, it mounts the files tested here, the API trusts the
proxy's network for X-Forwarded-*.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import select
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

from tests.support.processes import add_user, base_env, free_port, read_sse, spawn, wait_for_health
from tests.support.proxy import (
    MAIN_CONF,
    NGINX,
    REPO,
    TEMPLATES,
    compose,
    compose_proxy_env,
    interpolate,
    prepare,
    start_proxy,
)
from tests.support.stacks import job_body

needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="needs the nginx binary (apt-get install nginx; scripts/test installs it)"
)

HEADER_TIMEOUT_S = 1  # the test render's client_header_timeout (compose: 10s)
UPLOAD_LIMIT = "4m"  # the test render's upload limit (compose: 65m); the API's own cap is 8 MiB
PROXY_413 = "too large for the proxy"


# --- docker-compose.yml, no process -------------------------------------------------------------


def test_compose_publishes_only_the_proxy_and_mounts_the_tested_config():
    services = compose()["services"]
    published = {name for name, svc in services.items() if svc.get("ports")}
    assert published == {"proxy"}, f"only the proxy may publish host ports, not {published - {'proxy'}}"
    proxy = services["proxy"]
    assert proxy["image"].startswith("nginx:") and "alpine" in proxy["image"]
    assert "8000" in [str(p) for p in services["api"].get("expose", [])]
    mounts = {}
    for volume in proxy["volumes"]:
        source, target, *_ = interpolate(volume).split(":")
        mounts[target] = (REPO / source).resolve()
    # exactly what tests/support/proxy.py renders and runs
    assert mounts["/etc/nginx/nginx.conf"] == MAIN_CONF
    assert mounts["/etc/nginx/templates"] == TEMPLATES
    assert mounts["/etc/nginx/certs"] == (REPO / "deploy" / "certs").resolve()
    env = compose_proxy_env()
    assert env["NGINX_ENVSUBST_FILTER"] == "^SPARSEGPT_"
    assert env["SPARSEGPT_UPSTREAM"] == "http://api:8000" and env["SPARSEGPT_TLS"] == "off"
    used = set(re.findall(r"\$\{(SPARSEGPT_\w+)\}", "".join(p.read_text() for p in TEMPLATES.rglob("*.template"))))
    assert used <= set(env), f"templates use variables compose does not set: {used - set(env)}"
    # the published ports are the ports nginx listens on (its redirect to HTTPS names the port)
    for port in proxy["ports"]:
        outside, inside = interpolate(port).split(":")
        assert outside == inside and inside in (env["SPARSEGPT_HTTP_PORT"], env["SPARSEGPT_HTTPS_PORT"])


def test_compose_api_trusts_forwarded_headers_from_the_proxy_network_only():
    doc = compose()
    services = doc["services"]
    subnet = interpolate(doc["networks"]["edge"]["ipam"]["config"][0]["subnet"])
    api_env = {k: interpolate(str(v)) for k, v in services["api"]["environment"].items()}
    proxy_address = interpolate(services["proxy"]["networks"]["edge"]["ipv4_address"])
    # The proxy's own address only: the subnet's gateway is the Docker host, whose users must not
    # be believed about the client's address or scheme.
    assert api_env["SPARSEGPT_FORWARDED_ALLOW_IPS"] == proxy_address
    assert ipaddress.ip_address(proxy_address) in ipaddress.ip_network(subnet)
    assert api_env["SPARSEGPT_ALLOWED_HOSTS"] == "localhost"  # ${SPARSEGPT_HOSTNAME:-localhost}
    assert (
        interpolate(
            services["api"]["environment"]["SPARSEGPT_ALLOWED_HOSTS"], {"SPARSEGPT_HOSTNAME": "gpu.example.org"}
        )
        == "gpu.example.org"
    )
    assert list(services["proxy"]["networks"]) == ["edge"] and "edge" in services["api"]["networks"]
    others = [
        name for name, svc in services.items() if name not in ("api", "proxy") and "edge" in (svc.get("networks") or [])
    ]
    assert others == [], f"only the proxy and the API belong on the trusted edge network: {others}"
    # uvicorn (the API's server) takes a CIDR in forwarded_allow_ips
    from uvicorn.middleware.proxy_headers import _TrustedHosts

    trusted = _TrustedHosts(api_env["SPARSEGPT_FORWARDED_ALLOW_IPS"])
    gateway = str(next(ipaddress.ip_network(subnet).hosts()))
    assert proxy_address in trusted and gateway not in trusted and "192.0.2.1" not in trusted


@needs_nginx
@pytest.mark.parametrize("tls", ["off", "on"])
def test_compose_render_is_valid_nginx(tls, tmp_path):
    """`nginx -t` of exactly what the container renders (ports 80/443, upstream api:8000)."""
    import subprocess

    env = compose_proxy_env() | {"SPARSEGPT_TLS": tls}
    cmd = prepare(tmp_path, env)
    result = subprocess.run(
        [*cmd[:-2], "-t", "-g", cmd[-1].replace("daemon off;", "")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# --- the proxy in front of a real API -----------------------------------------------------------


@pytest.fixture(scope="module")
def api(module_redis, models_dir, tmp_path_factory):
    """`sparsegpt serve --workers 0` in team mode, trusting X-Forwarded-* from 127.0.0.1 (the proxy)."""
    data = tmp_path_factory.mktemp("proxy-api")
    port = free_port()
    env = base_env(
        SPARSEGPT_DATA_DIR=str(data),
        DATABASE_URL=f"sqlite:///{data / 'sparsegpt.db'}",
        REDIS_URL=module_redis.url,
        SPARSEGPT_LOCAL_DIRS=str(models_dir),
        SPARSEGPT_QUEUE=f"proxy-{secrets.token_hex(3)}",
        SPARSEGPT_AUTH="required",
        SPARSEGPT_ALLOWED_HOSTS="127.0.0.1,sparsegpt.test",
        SPARSEGPT_FORWARDED_ALLOW_IPS="127.0.0.1",
        SPARSEGPT_MAX_UPLOAD_BYTES=str(8 * 1024 * 1024),
        SPARSEGPT_MIN_FREE_DISK_MB="1",
    )
    token = add_user(env, "proxyadmin", admin=True)
    # --log-level info: uvicorn's access log names the client address the API believes
    proc = spawn(
        ["serve", "--workers", "0", "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"],
        env,
        data / "api.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, proc)
        yield {"base": base, "token": token, "proc": proc, "env": env}
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def proxy(api, tmp_path_factory):
    proxy = start_proxy(
        tmp_path_factory.mktemp("nginx"),
        api["base"],
        SPARSEGPT_PROXY_HEADER_TIMEOUT=f"{HEADER_TIMEOUT_S}s",
        SPARSEGPT_PROXY_MAX_UPLOAD=UPLOAD_LIMIT,
    )
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def tls_proxy(api, tmp_path_factory):
    proxy = start_proxy(tmp_path_factory.mktemp("nginx-tls"), api["base"], tls=True)
    yield proxy
    proxy.stop()


def tls_client(proxy, **kwargs) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(proxy.root / "certs" / "fullchain.pem"))
    return httpx.Client(base_url=proxy.base, verify=context, timeout=30, **kwargs)


@needs_nginx
def test_health_through_the_proxy(proxy):
    response = httpx.get(f"{proxy.base}/health?probe=health", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["server"] == "nginx"  # server_tokens off: no version
    assert 'upstream="127.0.0.1:' in proxy.log_line("probe=health")


@needs_nginx
def test_body_over_the_proxy_limit_is_refused_by_nginx(proxy, api):
    """An ordinary route's body over SPARSEGPT_PROXY_MAX_BODY (2m): 413 from nginx, also chunked,
    and the API never sees the request (the access log has no upstream for it)."""
    big = b"{" + b" " * (3 * 1024 * 1024) + b"}"
    with httpx.Client(base_url=proxy.base, timeout=30) as client:
        response = client.post("/api/v1/jobs?probe=length", content=big, headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and PROXY_413 in response.json()["detail"]
        assert 'upstream="-"' in proxy.log_line("probe=length")

        def chunks():
            for _ in range(48):
                yield b" " * 65536

        response = client.post(
            "/api/v1/jobs?probe=chunked", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413 and PROXY_413 in response.json()["detail"]
        assert 'upstream="-"' in proxy.log_line("probe=chunked")


@needs_nginx
def test_uploads_get_the_upload_limit(proxy, api):
    """The upload routes take files above the ordinary limit up to SPARSEGPT_PROXY_MAX_UPLOAD;
    beyond it nginx refuses them too."""
    headers = {"Authorization": f"Bearer {api['token']}"}
    text = ("the quick brown fox jumps over the lazy dog\n" * 72_000).encode()  # ~3.2 MB
    with httpx.Client(base_url=proxy.base, timeout=60, headers=headers) as client:
        response = client.post(
            "/api/v1/calibration-sets?probe=upload-ok", files={"file": ("calib.txt", text, "text/plain")}
        )
        assert response.status_code == 201, response.text
        assert 'upstream="127.0.0.1:' in proxy.log_line("probe=upload-ok")
        response = client.post(
            "/api/v1/calibration-sets?probe=upload-big", files={"file": ("calib.txt", text * 2, "text/plain")}
        )
        assert response.status_code == 413 and PROXY_413 in response.json()["detail"]
        assert 'upstream="-"' in proxy.log_line("probe=upload-big")


@needs_nginx
def test_progress_stream_is_not_buffered(proxy, api, module_redis):
    """SSE through the proxy: the snapshot arrives at once, and a progress event written to the
    job's stream reaches the client within a second (a buffering proxy holds both until its
    buffer fills, which an idle job's keep-alives take minutes to do)."""
    import redis

    from app import streams

    headers = {"Authorization": f"Bearer {api['token']}"}
    # a read waiting 10 s is a held-back stream (the API sends a keep-alive comment every 5 s)
    with httpx.Client(base_url=proxy.base, timeout=httpx.Timeout(30, read=10), headers=headers) as client:
        created = client.post("/api/v1/jobs", json=job_body(Path(api["env"]["SPARSEGPT_LOCAL_DIRS"])))
        assert created.status_code in (200, 201, 202), created.text
        job_id = created.json()["id"]
        started = time.monotonic()
        with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers.get("x-accel-buffering") == "no"
            events = read_sse(response)
            first = next(events)
            assert first["event"] == "snapshot", first
            assert time.monotonic() - started < 3, "the snapshot was held back"
            sent = time.monotonic()
            streams.publish(
                redis.Redis.from_url(module_redis.url),
                job_id,
                "progress",
                {"stage": "pruning", "probe": "unbuffered"},
                maxlen=100,
            )
            event = next(events)
            assert event["event"] == "progress" and event["data"]["probe"] == "unbuffered", event
            assert time.monotonic() - sent < 1.5, f"progress took {time.monotonic() - sent:.2f}s through the proxy"


def _slow_client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return sock


def _closed(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(4096) == b""
    except OSError:
        return True


@needs_nginx
def test_slow_headers_are_cut_by_the_header_timeout(proxy):
    """Slowloris at the proxy: a client trickling header lines is closed once the whole head has
    taken longer than client_header_timeout (trickling does not extend it), and 300 such
    connections neither slow /health down nor outlive the timeout."""
    sock = _slow_client(proxy.http_port)
    started, closed_after = time.monotonic(), None
    while time.monotonic() - started < 10:
        try:
            sock.sendall(b"X-Slow: 1\r\n")
        except OSError:
            closed_after = time.monotonic() - started
            break
        if _closed(sock):
            closed_after = time.monotonic() - started
            break
        time.sleep(0.2)
    sock.close()
    assert closed_after is not None, "a client trickling headers for 10 s was never cut"
    assert HEADER_TIMEOUT_S * 0.8 <= closed_after < HEADER_TIMEOUT_S + 3, closed_after

    crowd = [_slow_client(proxy.http_port) for _ in range(300)]
    try:
        started = time.monotonic()
        response = httpx.get(f"{proxy.base}/health", timeout=10)
        assert response.status_code == 200 and time.monotonic() - started < 2
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 4
        while time.monotonic() < deadline and not all(_closed(s) for s in crowd):
            time.sleep(0.2)
        still_open = sum(1 for s in crowd if not _closed(s))
        assert still_open == 0, f"{still_open} half-open connections outlived the header timeout"
    finally:
        for s in crowd:
            s.close()


@needs_nginx
def test_sign_in_is_rate_limited_per_address(api, tmp_path):
    """POST /login: bursts of 10, then 10 a minute per address; beyond it 429 from nginx (with
    Retry-After), the API not asked."""
    proxy = start_proxy(tmp_path / "nginx", api["base"])
    try:
        statuses = []
        with httpx.Client(base_url=proxy.base, timeout=10) as client:
            for n in range(20):
                response = client.post(f"/login?probe=login{n}", data={"token": "sgpt_wrong"})
                statuses.append(response.status_code)
                if response.status_code == 429:
                    assert "proxy limit" in response.json()["detail"] and response.headers["retry-after"]
                    assert 'upstream="-"' in proxy.log_line(f"probe=login{n} ")
            # reads are not limited
            assert all(client.get("/health").status_code == 200 for _ in range(30))
        assert 429 not in statuses[:10], statuses
        assert statuses.count(429) >= 5, statuses
    finally:
        proxy.stop()


# --- what the API learns from the proxy (SPARSEGPT_ALLOWED_HOSTS, SPARSEGPT_FORWARDED_ALLOW_IPS) ---


def _sign_in(client: httpx.Client, token: str) -> httpx.Response:
    """The dashboard's sign-in as a browser does it (its Origin): the API's cross-site check
    compares that Origin with the scheme it was told and the Host with its port, so this only
    succeeds when the proxy passes both."""
    page = client.get("/login")
    assert page.status_code == 200, page.text
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    data = {"token": token, "next": "/"} | ({"csrf_token": match.group(1)} if match else {})
    origin = str(client.base_url).rstrip("/")
    return client.post("/login", data=data, headers={"Origin": origin})


@needs_nginx
def test_session_cookie_is_secure_behind_https(tls_proxy, proxy, api):
    """Item 13: the proxy sends X-Forwarded-Proto, the API believes it from the proxy's address,
    and the session cookie set over HTTPS is Secure (over plain HTTP it cannot be)."""
    with tls_client(tls_proxy, follow_redirects=False) as client:
        response = _sign_in(client, api["token"])
        assert response.status_code == 303, response.text
        cookie = response.headers["set-cookie"]
        assert "secure" in cookie.lower(), f"session cookie over HTTPS without Secure: {cookie}"
    with httpx.Client(base_url=proxy.base, timeout=30, follow_redirects=False) as client:
        response = _sign_in(client, api["token"])
        assert response.status_code == 303, response.text
        assert "secure" not in response.headers["set-cookie"].lower()


@needs_nginx
def test_tls_mode_redirects_plain_http(tls_proxy):
    response = httpx.get(f"{tls_proxy.http_base}/jobs?page=2", timeout=10)
    assert response.status_code == 308
    assert response.headers["location"] == f"https://127.0.0.1:{tls_proxy.https_port}/jobs?page=2"
    assert httpx.get(f"{tls_proxy.http_base}/health", timeout=10).status_code == 200  # the container's healthcheck


@needs_nginx
def test_api_sees_the_client_address_not_the_proxy_or_a_forged_one(tls_proxy, api):
    """X-Forwarded-For reaches the API, set by nginx from the connection (a client's own header
    is replaced): a client connecting from 127.0.0.2 is 127.0.0.2 in the API's access log."""
    marker = f"probe-{secrets.token_hex(4)}"
    transport = httpx.HTTPTransport(
        local_address="127.0.0.2",
        verify=ssl.create_default_context(cafile=str(tls_proxy.root / "certs" / "fullchain.pem")),
    )
    with httpx.Client(base_url=tls_proxy.base, transport=transport, timeout=30) as client:
        response = client.get(
            f"/health?{marker}", headers={"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9"}
        )
        assert response.status_code == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and marker not in api["proc"].log.read_text(errors="replace"):
        time.sleep(0.1)
    lines = [line for line in api["proc"].log.read_text(errors="replace").splitlines() if marker in line]
    assert lines, f"the API's access log has no line for {marker}:\n{api['proc'].tail(20)}"
    assert "127.0.0.2:" in lines[-1] and "203.0.113.9" not in lines[-1], lines[-1]


@needs_nginx
def test_host_header_reaches_the_api(proxy):
    """The proxy passes the Host the client sent (the API checks it against
    SPARSEGPT_ALLOWED_HOSTS: here 127.0.0.1 and sparsegpt.test), not its own upstream address."""
    with httpx.Client(base_url=proxy.base, timeout=10) as client:
        assert client.get("/login", headers={"Host": f"sparsegpt.test:{proxy.http_port}"}).status_code == 200
        refused = client.get("/login", headers={"Host": "rebound.example"})
        assert refused.status_code == 400, (refused.status_code, refused.text[:300])


@needs_nginx
def test_an_anonymous_upload_is_refused_before_its_body(proxy):
    """The upload routes stream through nginx: the API refuses a caller without a token from the
    headers alone, so the 401 comes back before the body is sent and nothing is stored at the
    proxy (buffered, nginx read the whole declared body into a temp file first)."""
    host, port = proxy.base.removeprefix("http://").split(":")
    for path in ("/api/v1/calibration-sets", "/jobs/new"):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                (
                    f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
                    f"boundary=x\r\nContent-Length: 1000000\r\nAccept: application/json\r\n\r\n"
                ).encode()
            )
            sock.sendall(b"--x\r\n")  # a start of the body, then nothing
            ready, _, _ = select.select([sock], [], [], 5)
            assert ready, f"{path}: no answer before the body was sent (nginx buffers it)"
            head = sock.recv(4096).decode("latin-1")
        assert head.startswith("HTTP/1.1 401") or head.startswith("HTTP/1.1 303"), (path, head[:200])
