"""Several servers on one machine, for the multi-server tests: an S3 server (moto's server mode,
a real HTTP process), and workers started with their own data directory and flags, seen through
their Redis registration (the API may be down)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.support.processes import Proc, free_port, spawn


@dataclass
class S3Server:
    directory: Path
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        binary = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "moto.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        import httpx

        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.endpoint, timeout=1)
                return
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto_server did not start:\n{(self.directory / 'moto.log').read_text()}"
                    ) from None
                time.sleep(0.1)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        found = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"] for o in found)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextmanager
def s3_bucket(directory: Path, bucket: str) -> Iterator[S3Server]:
    """A started S3 server holding an empty ``bucket``, stopped when the block ends."""
    server = S3Server(directory)
    server.start()
    try:
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        server.stop()


def start_worker(stack, name: str, *args: str, **env: str) -> Proc:
    """``sparsegpt worker --hostname=<name>@%h ARGS`` with ``env`` over the stack's (its own
    SPARSEGPT_DATA_DIR, say); returns once its registration is in Redis."""
    proc = spawn(
        ["worker", f"--hostname={name}@%h", "--loglevel=info", *args],
        {**stack.env, **env},
        stack.logs / f"worker-{name}-{len(stack.workers)}.log",
    )
    stack.workers.append(proc)
    r = redis.Redis.from_url(stack.env["REDIS_URL"])
    deadline = time.monotonic() + 60
    while not any(
        k.decode().rsplit(":", 1)[-1].startswith(f"{name}@") for k in r.scan_iter(match="sparsegpt:worker:*")
    ):
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker {name} not seen:\n{proc.tail()}")
        time.sleep(0.2)
    return proc
