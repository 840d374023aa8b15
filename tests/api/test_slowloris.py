"""Slowloris against a real API process (``sparsegpt serve``, uvicorn with app.serve.EdgeProtocol):
thousands of connections that send half a request and then nothing. The server must keep
answering /health, close them after the header timeout, hold no more connections than its
bound (below its open-files limit), and not flood its log; a kept-alive connection gets the
same deadline for its next request's headers and is closed when idle."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from app.log_limits import RateLimitedFilter
from tests.support.paths import REPO
from tests.support.processes import Proc, base_env, free_port, wait_for_health

HALF_OPEN = 3000
HEADER_TIMEOUT = 2.0
BOUND = 400
# The API starts with the usual soft open-files limit, below the flood, and a higher hard limit
# (what `sparsegpt serve` raises it to).
SERVER_FILES = (1024, 8192)


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, SERVER_FILES)


@contextlib.contextmanager
def _serve(redis_server, tmp_path, bound: int):
    """``sparsegpt serve --workers 0`` with this test's timeouts and at most ``bound`` connections."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < SERVER_FILES[1]:
        pytest.skip(f"needs a hard open-files limit of {SERVER_FILES[1]} (it is {hard})")
    port = free_port()
    env = base_env(
        SPARSEGPT_DATA_DIR=str(tmp_path / "data"),
        REDIS_URL=redis_server.url,
        SPARSEGPT_AUTH="required",
        SPARSEGPT_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT),
        SPARSEGPT_KEEPALIVE_TIMEOUT_S="1",
        SPARSEGPT_MAX_CONNECTIONS=str(bound),
    )
    log = tmp_path / "api.log"
    with log.open("wb") as handle:
        popen = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--workers", "0", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_limit_files,
        )
    api = Proc(popen, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, api)
        yield api, port
    finally:
        api.stop()


@pytest.fixture
def slow_server(redis_server, tmp_path):
    with _serve(redis_server, tmp_path, BOUND) as served:
        yield served


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed this connection (EOF or reset), without waiting."""
    try:
        return sock.recv(4096, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (headers and its content-length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def _files_limit(pid: int) -> int:
    line = next(line for line in open(f"/proc/{pid}/limits") if line.startswith("Max open files"))
    return int(line.split()[3])


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
def test_a_stalled_process_does_not_take_in_its_whole_listen_queue(slow_server):
    """The API stopped (SIGSTOP: a loaded machine, a long pause) while 1500 half-open connections
    queue up in the kernel: when it runs again it accepts only into room, so its open files stay
    at the bound at every moment, not just after a trim; /health still answers."""
    api, port = slow_server
    socks: list[socket.socket] = []
    os.kill(api.popen.pid, signal.SIGSTOP)
    try:
        for _ in range(1500):
            sock = socket.socket()
            sock.settimeout(3)
            sock.connect(("127.0.0.1", port))  # the kernel completes the handshake into the queue
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            socks.append(sock)
    finally:
        os.kill(api.popen.pid, signal.SIGCONT)
    try:
        peak, until = 0, time.monotonic() + 1.5
        while time.monotonic() < until:
            peak = max(peak, _open_files(api.popen.pid))
            time.sleep(0.002)
        assert peak <= BOUND + 60, f"the API held {peak} open files right after it ran again (bound {BOUND})"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.slow
def test_half_open_connections_are_timed_out_and_bounded(slow_server):
    api, port = slow_server
    assert _files_limit(api.popen.pid) == SERVER_FILES[1], "the soft limit is raised to the hard one"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < HALF_OPEN + 200:
        if hard != resource.RLIM_INFINITY and hard < HALF_OPEN + 200:
            pytest.skip(f"this test opens {HALF_OPEN} sockets; the open-files limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (HALF_OPEN + 200, hard))
    socks: list[socket.socket] = []
    failed_connects = 0
    opened = threading.Event()

    def flood() -> None:
        nonlocal failed_connects
        for _ in range(HALF_OPEN):
            sock = socket.socket()
            sock.settimeout(3)
            try:
                sock.connect(("127.0.0.1", port))
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                socks.append(sock)
            except OSError:
                failed_connects += 1
                sock.close()
        opened.set()

    health: list[tuple[float, int | str]] = []
    peak_files = 0
    started = time.monotonic()
    opened_at: float | None = None
    attacker = threading.Thread(target=flood, daemon=True)
    attacker.start()
    try:
        # /health answers throughout the flood and until the header timeout has run out.
        while time.monotonic() - started < 40:
            if opened_at is None and opened.is_set():
                opened_at = time.monotonic()
            if opened_at is not None and time.monotonic() > opened_at + HEADER_TIMEOUT + 2:
                break
            t0 = time.monotonic()
            try:
                status: int | str = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code
            except httpx.HTTPError as err:
                status = type(err).__name__
            health.append((round(time.monotonic() - t0, 2), status))
            peak_files = max(peak_files, _open_files(api.popen.pid))
            time.sleep(0.3)
        attacker.join(timeout=30)
        assert len(socks) > HALF_OPEN * 0.9, f"only {len(socks)} connections opened ({failed_connects} failed)"
        assert health and all(status == 200 for _, status in health), health
        assert max(seconds for seconds, _ in health) < 4, health
        assert peak_files <= BOUND + 150, f"the API held {peak_files} open files (bound {BOUND})"
        # Every half-open connection was closed by the server (made room for, or timed out).
        deadline = time.monotonic() + HEADER_TIMEOUT + 5
        while time.monotonic() < deadline:
            still_open = sum(1 for sock in socks if not _closed(sock))
            if still_open == 0:
                break
            time.sleep(0.5)
        assert still_open == 0, f"{still_open} of {len(socks)} half-open connections still open"
        print(
            f"{len(socks)} half-open connections, {failed_connects} refused at connect; /health took at most "
            f"{max(seconds for seconds, _ in health)} s over {len(health)} probes; the API held at most "
            f"{peak_files} files"
        )
    finally:
        for sock in socks:
            sock.close()
    assert api.log.stat().st_size < 1_000_000, f"the log grew to {api.log.stat().st_size} bytes:\n{api.tail(20)}"
    assert api.popen.poll() is None


@pytest.mark.slow
def test_kept_alive_connections_get_the_same_deadlines(slow_server):
    _, port = slow_server
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    # A next request that never finishes its headers: closed after the header timeout.
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request)
    assert _read_response(sock).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /health HTTP/1.1\r\nHo")
    started = time.monotonic()
    for _ in range(40):  # a byte every 0.25 s resets no timer
        time.sleep(0.25)
        try:
            sock.sendall(b"x")
        except OSError:
            break
    sock.settimeout(10)
    try:
        tail = sock.recv(4096)
    except OSError:
        tail = b""
    assert tail == b"" and time.monotonic() - started < HEADER_TIMEOUT + 2, (tail, time.monotonic() - started)
    sock.close()
    # An idle kept-alive connection: closed after the keep-alive timeout (1 s here).
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request)
    assert _read_response(sock).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    assert sock.recv(4096) == b"" and time.monotonic() - started < 3
    sock.close()


def _login_head(length: int) -> bytes:
    return (
        b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )


@pytest.mark.slow
def test_a_body_sent_a_byte_at_a_time_is_refused_after_its_grace(slow_server):
    """Headers complete, then a public form body (/login, no sign-in) a byte a second: each is
    answered 408 and closed after the grace (the header timeout; app.guard.MIN_BODY_RATE), while
    /health answers; a whole small form, and one that comes in pieces above the floor, still do."""
    _, port = slow_server
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
    for sock in socks:
        sock.sendall(_login_head(100_000) + b"token=")
        sock.setblocking(False)  # a socket with a timeout waits in recv even with MSG_DONTWAIT
    started, ends, health = time.monotonic(), {}, []
    try:
        while len(ends) < len(socks) and time.monotonic() - started < HEADER_TIMEOUT + 8:
            for index, sock in enumerate(socks):
                if index not in ends:
                    try:
                        sock.send(b"x", socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        pass
                    except OSError:
                        ends[index] = (time.monotonic() - started, b"")
            health.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code)
            time.sleep(1.0)
            for index, sock in enumerate(socks):
                answer = None if index in ends else _closed_or_answered(sock)
                if answer is not None:
                    ends[index] = (time.monotonic() - started, answer)
        assert len(ends) == len(socks), (
            f"{len(socks) - len(ends)} slow bodies still open after {time.monotonic() - started:.1f} s"
        )
        assert max(seconds for seconds, _ in ends.values()) < HEADER_TIMEOUT + 5, ends
        assert all(answer.startswith(b"HTTP/1.1 408") or answer == b"" for _, answer in ends.values()), ends
        assert any(answer.startswith(b"HTTP/1.1 408") for _, answer in ends.values()), ends
        assert health and all(status == 200 for status in health), health
    finally:
        for sock in socks:
            sock.close()
    form = b"token=not-a-token&next=%2F"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # whole and small
        sock.sendall(_login_head(len(form)) + form)
        assert _read_response(sock).split(b" ")[1] in (b"401", b"403")
    padded = form + b"&pad=" + b"p" * (60_000 - len(form) - 5)  # ~27 KiB/s, longer than the grace
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_login_head(len(padded)))
        for offset in range(0, len(padded), 8192):
            sock.sendall(padded[offset : offset + 8192])
            time.sleep(0.3)
        assert _read_response(sock).split(b" ")[1] in (b"401", b"403")


def _closed_or_answered(sock: socket.socket) -> bytes | None:
    """What the server answered (b"": it closed this connection), or None: nothing yet."""
    try:
        return sock.recv(4096, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def test_running_out_of_files_is_logged_once_per_interval():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    limit = RateLimitedFilter(interval_s=0.5)
    handler.addFilter(limit)
    logger = logging.getLogger("tests.edge.files")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for _ in range(1000):
            try:
                raise OSError(errno.EMFILE, "Too many open files")
            except OSError:
                logger.exception("socket.accept() out of system resource")
            logger.error(
                "Exception in ASGI application", exc_info=OSError(errno.ENFILE, "Too many open files in system")
            )
        logger.error("an unrelated error")
        time.sleep(0.6)
        logger.error("socket.accept() out of system resource")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "socket.accept() out of system resource",
        "an unrelated error",
        "socket.accept() out of system resource (1999 more like it in the last interval)",
    ], lines


@pytest.mark.slow
def test_with_every_connection_in_a_request_a_new_one_gets_503_at_once(redis_server, tmp_path):
    """A bound of 4 held by 4 requests whose bodies have not come yet: nothing can be closed to
    make room, so a fifth connection is answered 503 with Retry-After at once (not left waiting
    or accepted beyond the bound); once those requests end (408 after the grace), it is served."""
    with _serve(redis_server, tmp_path, 4) as (api, port):
        busy = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
        try:
            for sock in busy:
                sock.sendall(_login_head(100) + b"token=")
            time.sleep(0.3)
            started = time.monotonic()
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            sock.close()
            assert data.startswith(b"HTTP/1.1 503") and b"retry-after: 2" in data.lower(), data
            assert time.monotonic() - started < 1.5
            assert _open_files(api.popen.pid) <= 4 + 60
            deadline = time.monotonic() + HEADER_TIMEOUT + 8
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            else:
                pytest.fail("no connection was served after the busy requests ended")
        finally:
            for sock in busy:
                sock.close()
        assert api.popen.poll() is None
