"""Cheap SSE clients over raw sockets (many at once), an API process of a test's own with a job
that stays queued (no worker consumes its queue), and the CPU time that process used."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.processes import Proc, add_user, base_env, free_port, spawn, wait_for_health
from tests.support.stacks import job_body

KEEPALIVE = b": keepalive"
UNAVAILABLE = b"redis unavailable"


@dataclass
class Api:
    proc: Proc
    port: int
    token: str
    env: dict[str, str]
    jobs: list[int] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def new_job(self, models_dir: Path) -> int:
        response = httpx.post(f"{self.base}/api/v1/jobs", json=job_body(models_dir), headers=self.auth, timeout=30)
        assert response.status_code == 201, response.text[:500]
        self.jobs.append(response.json()["id"])
        return self.jobs[-1]

    def cpu_s(self) -> float:
        """User + system CPU seconds of the API process so far (/proc/<pid>/stat)."""
        fields = Path(f"/proc/{self.proc.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_api(tmp_path: Path, redis_url: str, models_dir: Path, name: str = "api", **settings: str) -> Api:
    """``sparsegpt serve --workers 0`` on SQLite, sign-in required, one admin; ``settings`` as
    SPARSEGPT_<NAME> variables."""
    data = tmp_path / f"{name}-data"
    env = base_env(
        SPARSEGPT_DATA_DIR=str(data),
        DATABASE_URL=f"sqlite:///{data / 'sparsegpt.db'}",
        REDIS_URL=redis_url,
        SPARSEGPT_LOCAL_DIRS=str(models_dir),
        SPARSEGPT_QUEUE=f"sse-{secrets.token_hex(3)}",
        SPARSEGPT_AUTH="required",
        SPARSEGPT_MIN_FREE_DISK_MB="1",
    )
    env.update({f"SPARSEGPT_{k.upper()}": str(v) for k, v in settings.items()})
    token = add_user(env, f"admin{secrets.token_hex(3)}", admin=True)
    port = free_port()
    proc = spawn(
        ["serve", "--workers", "0", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env,
        tmp_path / f"{name}.log",
    )
    try:
        wait_for_health(f"http://127.0.0.1:{port}", proc)
    except BaseException:
        proc.stop()
        raise
    return Api(proc, port, token, env)


def _request(api: Api, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\nAccept: text/event-stream\r\n"
        f"Authorization: Bearer {api.token}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()


class SyncStream:
    """One SSE response read from a blocking socket: the raw bytes (chunked framing and all)."""

    def __init__(self, api: Api, path: str, timeout: float = 30):
        self.sock = socket.create_connection(("127.0.0.1", api.port), timeout=timeout)
        self.sock.sendall(_request(api, path))
        self.data = b""
        self.read_until(b"\r\n\r\n", timeout)
        self.status = int(self.data.split(b" ", 2)[1])

    def read_until(self, marker: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while marker not in self.data:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False
            if not chunk:
                return False
            self.data += chunk
        return True

    def read_for(self, seconds: float) -> bytes:
        """Everything that arrives in the next ``seconds`` (the stream stays open)."""
        self.read_until(b"\x00never\x00", seconds)
        return self.data

    def close(self) -> None:
        self.sock.close()


class ManyStreams:
    """``count`` SSE streams on one asyncio loop (in the caller's thread, run step by step)."""

    def __init__(self, api: Api, path: str, count: int):
        self.api, self.path, self.count = api, path, count
        self.loop = asyncio.new_event_loop()
        self.data: list[bytearray] = [bytearray() for _ in range(count)]
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task] = []

    async def _reader(self, index: int, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(65536):
            self.data[index] += chunk

    async def _open(self, index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.api.port)
        writer.write(_request(self.api, self.path))
        await writer.drain()
        self.writers.append(writer)
        self.tasks.append(asyncio.ensure_future(self._reader(index, reader)))

    def open(self, batch: int = 50) -> None:
        async def opening(indices: range) -> None:
            await asyncio.gather(*(self._open(i) for i in indices))

        for start in range(0, self.count, batch):
            self.loop.run_until_complete(opening(range(start, min(self.count, start + batch))))

    def wait_all(self, marker: bytes, timeout: float) -> int:
        """Run the loop until every stream has received ``marker``; how many did."""

        async def waiting() -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.missing(marker):
                await asyncio.sleep(0.1)

        self.loop.run_until_complete(waiting())
        return self.count - self.missing(marker)

    def missing(self, marker: bytes) -> int:
        return sum(1 for d in self.data if marker not in d)

    def run_in_background(self):
        """Keep reading in a thread while the caller measures; returns a stop() function."""
        import threading

        stop_event = asyncio.Event()
        thread = threading.Thread(target=lambda: self.loop.run_until_complete(stop_event.wait()), daemon=True)
        thread.start()

        def stop() -> None:
            self.loop.call_soon_threadsafe(stop_event.set)
            thread.join(timeout=30)

        return stop

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        for task in self.tasks:
            task.cancel()

        async def ending() -> None:
            await asyncio.gather(*self.tasks, return_exceptions=True)

        self.loop.run_until_complete(ending())
        self.loop.close()
