"""Helpers for the edge tests (tests/api/test_edge.py, test_slowloris.py): a server of a test's
own, the API's memory from /proc, raw HTTP requests whose body streams from a thread while the
answer is read, and a page on another origin for the browser's cross-site attempts."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import Proc, add_user, base_env, serve_api


@dataclass
class Server:
    base: str
    port: int
    env: dict[str, str]
    api: Proc
    token: str


@contextmanager
def server(tmp: Path, redis_url: str, *, host: str = "127.0.0.1", **settings: str) -> Iterator[Server]:
    """``sparsegpt serve --workers 0`` on SQLite, with one admin account (no worker: jobs stay queued)."""
    env = base_env(SPARSEGPT_DATA_DIR=str(tmp / "data"), REDIS_URL=redis_url, SPARSEGPT_MIN_FREE_DISK_MB="1")
    env.update({f"SPARSEGPT_{k.upper()}": str(v) for k, v in settings.items()})
    token = add_user(env, "edgeadmin", admin=True)
    with serve_api(env, tmp / "api.log", host=host) as (base, port, api):
        yield Server(base, port, env, api, token)


def memory_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class PeakRSS:
    """The highest VmRSS of a process while the block runs (sampled every 5 ms), and its VmHWM."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.start_rss = self.start_hwm = self.end_hwm = 0

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, memory_kb(self.pid))

    def __enter__(self) -> PeakRSS:
        self.start_rss, self.start_hwm = memory_kb(self.pid), memory_kb(self.pid, "VmHWM")
        self.peak = self.start_rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.end_hwm = memory_kb(self.pid, "VmHWM")

    @property
    def growth_mb(self) -> float:
        return max(self.peak - self.start_rss, self.end_hwm - self.start_hwm) / 1024


@dataclass
class Answer:
    status: int | None
    seconds: float
    head: bytes
    sent: int


def raw_request(port: int, head: bytes, body: Iterable[bytes], *, timeout: float = 30) -> Answer:
    """Send ``head`` then stream ``body`` from a thread (until the server stops taking it) while
    the status line and headers are read; the time is to the answer's headers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sent = 0

    def pump() -> None:
        nonlocal sent
        try:
            for chunk in body:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server answered and closed

    started = time.monotonic()
    sock.sendall(head)
    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    received = b""
    try:
        while b"\r\n\r\n" not in received:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    except OSError:
        pass
    seconds = time.monotonic() - started
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
    thread.join(timeout=30)
    status = int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.1 ") else None
    return Answer(status, seconds, received.split(b"\r\n\r\n", 1)[0], sent)


def filler(total: int, chunk: int = 1 << 20, *, chunked: bool = False) -> Iterator[bytes]:
    """``total`` bytes of 'a' in chunks (HTTP/1.1 chunked framing when ``chunked``)."""
    block = b"a" * chunk
    left = total
    while left > 0:
        piece = block[: min(chunk, left)]
        left -= len(piece)
        yield b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
    if chunked:
        yield b"0\r\n\r\n"


def framed(parts: Iterable[bytes], *, chunked: bool) -> Iterator[bytes]:
    for part in parts:
        yield b"%x\r\n%s\r\n" % (len(part), part) if chunked else part
    if chunked:
        yield b"0\r\n\r\n"


@contextmanager
def page_server(pages: dict[str, str]) -> Iterator[str]:
    """A tiny HTTP server on another port (another origin) serving ``pages``; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = pages.get(self.path.split("?")[0])
            if body is None:
                self.send_error(404)
                return
            data = body.encode()
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
