"""Issue 22 item 11: the API checks an artifact against its recorded sha256 as it streams it. A
stored artifact changed after it was recorded (a file of the local store's directory; the S3
object) makes a whole download fail at the client (the body ends short) and is logged; a Range
download is sent as read (it cannot be checked whole). Served by a real uvicorn server through the
download route's own ``_serve`` and ``jobs.Download``."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from app import packagers
from app.api.jobs import _serve
from app.models import Artifact
from app.s3_store import S3Store
from app.services.jobs import Download
from app.storage import LocalStore
from tests.support.cluster import s3_bucket
from tests.support.processes import free_port

BUCKET = "digest-test"


def make_model(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 12_000)  # ~3 MB: several chunks
    return directory


class Served:
    """A uvicorn server in a thread whose one route serves ``self.download`` as the API does."""

    def __init__(self):
        self.download: Download | None = None
        app = FastAPI()
        app.get("/artifact")(lambda: _serve(self.download, None, None))
        app.get("/range")(lambda: _serve(self.download, "bytes=0-99", None))
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=30)


@pytest.fixture(scope="module")
def served():
    with Served() as server:
        yield server


def download_of(store, location: str, size: int, sha: str) -> Download:
    row = Artifact(job_id=7, format="hf-tar", media_type="application/x-tar", path=location, size=size, sha256=sha)
    return Download(None, row, packagers.get("hf-tar"), store, "sparsegpt-job-7")


def check_whole_then_corrupt(served, caplog, corrupt) -> None:
    whole = served.get("/artifact")
    assert whole.status_code == 200
    assert hashlib.sha256(whole.content).hexdigest() == served.download.artifact.sha256
    corrupt()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="app.storage"):
        with pytest.raises(httpx.HTTPError):  # the body ends short of its Content-Length
            served.get("/artifact")
        deadline = time.monotonic() + 5
        while "does not match its recorded sha256" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "job 7's hf-tar artifact" in caplog.text and "does not match its recorded sha256" in caplog.text
    part = served.get("/range")  # a range is not checked: sent as read
    assert part.status_code == 206 and len(part.content) == 100


def test_a_changed_local_artifact_fails_the_download_and_is_logged(served, caplog, tmp_path):
    store = LocalStore(tmp_path / "data")
    model = make_model(tmp_path / "data" / "artifacts" / "7" / "attempt-1")
    location, size, sha = store.publish("artifacts/7/attempt-1", model, packagers.get("hf-tar"), "sparsegpt-job-7")
    served.download = download_of(store, location, size, sha)

    def corrupt():  # same size, one byte changed
        data = bytearray((model / "model.safetensors").read_bytes())
        data[1_000_000] ^= 0xFF
        (model / "model.safetensors").write_bytes(bytes(data))

    check_whole_then_corrupt(served, caplog, corrupt)


def test_a_changed_s3_object_fails_the_download_and_is_logged(served, caplog, tmp_path, monkeypatch):
    with s3_bucket(tmp_path / "s3", BUCKET) as s3:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        store = S3Store(f"s3://{BUCKET}/team")
        model = make_model(tmp_path / "model")
        location, size, sha = store.publish(
            "artifacts/7/sparsegpt-job-7.tar", model, packagers.get("hf-tar"), "sparsegpt-job-7"
        )
        served.download = download_of(store, location, size, sha)
        key = store.key_of(location)

        def corrupt():  # the object rewritten in place, same size
            data = bytearray(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
            data[len(data) // 2] ^= 0xFF
            s3.client().put_object(Bucket=BUCKET, Key=key, Body=bytes(data))

        check_whole_then_corrupt(served, caplog, corrupt)
