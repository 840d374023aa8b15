"""Real processes for the tests: the API and workers (``sparsegpt serve`` / ``worker``), a
redis-server of a test's own (to stop and restart), and the SSE parser of their streams."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.paths import REPO


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Proc:
    popen: subprocess.Popen
    log: Path

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)


def spawn(args: list[str], env: dict[str, str], log: Path) -> Proc:
    handle = log.open("wb")
    popen = subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    handle.close()
    return Proc(popen, log)


@contextmanager
def serve_api(env: dict[str, str], log: Path, *, host: str = "127.0.0.1") -> Iterator[tuple[str, int, Proc]]:
    """``sparsegpt serve --workers 0`` on a free port until the block ends: (base URL, port, process)."""
    port = free_port()
    api = spawn(["serve", "--workers", "0", "--host", host, "--port", str(port), "--log-level", "warning"], env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, api)
        yield base, port, api
    finally:
        api.stop()


def wait_for_health(base: str, proc: Proc, *, worker: str | None = None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"process exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            response = httpx.get(f"{base}/health", timeout=2)
            body = response.json()
            if response.status_code == 200 and (
                worker is None or any(w["name"].startswith(worker) for w in body["workers"])
            ):
                return body
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not healthy after {timeout}s: {body}\n{proc.tail()}")


def read_sse(response: httpx.Response) -> Iterator[dict]:
    """Parse a text/event-stream response into {"id", "event", "data"} dicts (data parsed)."""
    event: dict = {}
    for line in response.iter_lines():
        if line == "":
            if "data" in event:
                event["data"] = json.loads(event["data"])
                yield event
            event = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "data":
            event["data"] = event.get("data", "") + value
        elif key in ("id", "event"):
            event[key] = value


class RedisServer:
    """A redis-server of our own: start, stop (SIGKILL: nothing saved), start again on the same port."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def base_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SPARSEGPT_") and k not in ("REDIS_URL", "DATABASE_URL")
    }
    env.update(
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        SPARSEGPT_WORKER_DEVICE="cpu",
    )
    env.update(extra)
    return env


def add_user(env: dict[str, str], name: str, admin: bool = False) -> str:
    """`sparsegpt users add NAME`: the token is the last line of its output."""
    args = [sys.executable, "-m", "app.cli", "users", "add", name] + (["--admin"] if admin else [])
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1]


def kill_group(proc: Proc) -> None:
    if proc.popen.poll() is None:
        try:
            os.killpg(proc.popen.pid, signal.SIGTERM)
            proc.popen.wait(timeout=10)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.popen.wait(timeout=10)
