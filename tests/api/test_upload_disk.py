"""Uploads and the disk, with a real API process: a full disk while the body streams is a 507 with
the reason (was a 500), and the ``.upload-*`` temp file an API killed mid-upload leaves behind is
removed by the sweeper once it is old (a fresh one, an upload in progress, stays)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis

from app import db
from app.config import Settings
from app.services.upload_store import TEMP_MAX_AGE_S
from app.sweeper import sweep_once
from tests.support.processes import base_env, serve_api


def api_env(root: Path, redis_url: str) -> dict[str, str]:
    return base_env(
        SPARSEGPT_DATA_DIR=str(root / "data"),
        REDIS_URL=redis_url,
        SPARSEGPT_AUTH="off",
        SPARSEGPT_QUEUE=f"disk-{secrets.token_hex(3)}",
        SPARSEGPT_MIN_FREE_DISK_MB="0",
        SPARSEGPT_MAX_UPLOAD_BYTES=str(4 * 1024 * 1024),
    )


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """An uploads directory on a 64 KiB tmpfs (a real full disk: ENOSPC)."""
    uploads = tmp_path / "data" / "uploads"
    uploads.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(uploads)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"a small tmpfs cannot be mounted here: {done.stderr.decode(errors='replace').strip()}")
    yield tmp_path
    subprocess.run(["umount", "-l", str(uploads)], check=False)


def test_an_upload_on_a_full_disk_is_507_with_the_reason(small_disk, module_redis):
    with serve_api(api_env(small_disk, module_redis.url), small_disk / "api.log") as (base, _port, _proc):
        content = (secrets.token_hex(16) + " some words\n").encode() * 8000  # ~370 KB > 64 KiB
        response = httpx.post(
            f"{base}/api/v1/calibration-sets", files={"file": ("set.txt", content, "text/plain")}, timeout=30
        )
        assert response.status_code == 507, response.text
        assert "No space left on device" in response.json()["detail"], response.text
        assert not list((small_disk / "data" / "uploads").glob(".upload-*"))  # the partial file is gone
        small = httpx.post(
            f"{base}/api/v1/calibration-sets", files={"file": ("s.txt", b"a few words", "text/plain")}, timeout=30
        )
        assert small.status_code == 201, small.text  # the disk has room again


def _start_upload(port: int, head_bytes: int) -> socket.socket:
    """A multipart upload that sends ``head_bytes`` of its file and then nothing more."""
    boundary = "b" + secrets.token_hex(8)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="set.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n"
    ).encode()
    length = len(head) + 10 * head_bytes
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        (
            f"POST /api/v1/calibration-sets HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n"
        ).encode()
        + head
        + b"w" * head_bytes
    )
    return sock


def test_temp_files_of_an_api_killed_mid_upload_are_swept_once_old(tmp_path, module_redis):
    env = api_env(tmp_path, module_redis.url)
    uploads = tmp_path / "data" / "uploads"
    with serve_api(env, tmp_path / "api.log") as (_base, port, proc):
        sock = _start_upload(port, 200_000)
        deadline = time.monotonic() + 20
        while not list(uploads.glob(".upload-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(proc.popen.pid, signal.SIGKILL)  # kill -9 mid-upload (every process of the server)
        proc.popen.wait(timeout=10)
        sock.close()
    left = list(uploads.glob(".upload-*"))
    assert len(left) == 1, list(uploads.iterdir())
    fresh = uploads / ".upload-inprogress.txt"  # an upload another process is receiving now
    fresh.write_bytes(b"words")
    kept = uploads / ("a" * 64 + ".txt")  # a stored set's file (content-addressed): never a temp
    kept.write_bytes(b"words")
    old = time.time() - TEMP_MAX_AGE_S - 60
    os.utime(left[0], (old, old))
    os.utime(kept, (old, old))

    settings = Settings(data_dir=tmp_path / "data", redis_url=module_redis.url, queue=env["SPARSEGPT_QUEUE"])
    r = redis.Redis.from_url(module_redis.url, decode_responses=True)
    report = sweep_once(settings, db.session_factory(settings.database), r)
    assert report.upload_temps_removed == [left[0].name]
    assert not left[0].exists() and fresh.exists() and kept.exists()
