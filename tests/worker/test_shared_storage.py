"""Storage every machine reaches (SPARSEGPT_STORAGE_URL=s3://...): a real S3 server (moto's
server mode), PostgreSQL, Redis, the API and two workers, each with a data directory of its own,
as on three machines. The upload goes in through the API, the job runs on worker B, the archive
is streamed into the store and downloads through the API (whole and by Range) with the sha256
the job records; nothing of it stays on the API's or the worker's disk; DELETE and the retention
sweep remove the objects."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from tests.support.cluster import s3_bucket, start_worker
from tests.support.stacks import job_body

pytestmark = pytest.mark.slow
BUCKET, PREFIX = "sparsegpt-test", "team/a"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_bucket(tmp_path_factory.mktemp("s3"), BUCKET) as server:
        yield server


def files_under(directory: Path) -> list[str]:
    return (
        sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()) if directory.exists() else []
    )


def local_artifacts(*dirs: Path, wait_s: float = 10) -> list[str]:
    """Files under any artifacts/ directory, once the worker has cleaned up after recording the
    job (the status is written first)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        left = [f for d in dirs for f in files_under(d) if f.startswith("artifacts/")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_api_and_two_workers_share_everything_through_the_store(
    make_stack, redis_server, models_dir, s3, tmp_path, calib_bytes
):
    stack = make_stack(redis_server.url, storage_url=f"s3://{BUCKET}/{PREFIX}")
    stack.env.update(s3.env())
    api_dir, dir_a, dir_b = Path(stack.env["SPARSEGPT_DATA_DIR"]), tmp_path / "worker-a", tmp_path / "worker-b"
    stack.start_api()
    start_worker(stack, "a", SPARSEGPT_DATA_DIR=str(dir_a))
    start_worker(stack, "b", "--queue=only-b", SPARSEGPT_DATA_DIR=str(dir_b))
    with stack.client() as c:
        uploaded = c.post("/api/v1/calibration-sets", files={"file": ("wiki.txt", calib_bytes, "text/plain")})
        assert uploaded.status_code == 201, uploaded.text
        set_id, sha = uploaded.json()["id"], hashlib.sha256(calib_bytes).hexdigest()
        assert s3.keys(BUCKET, f"{PREFIX}/uploads/") == [f"{PREFIX}/uploads/{sha}.txt"]
        assert not any(sha in f for f in files_under(api_dir)), "no copy of the upload on the API's disk"
        body = job_body(
            models_dir,
            calibration={"dataset": f"upload:{set_id}", "nsamples": 4, "seqlen": 32},
            resources={"queue": "only-b"},
        )
        job_id = c.post("/api/v1/jobs", json=body).json()["id"]
    job = stack.wait(job_id, timeout=180)
    assert job["status"] == "succeeded" and job["worker"].startswith("b@"), job
    # Worker B fetched the upload into its cache; the archive went to the store, not to any disk.
    assert f"cache/uploads/{sha}.txt" in files_under(dir_b)
    assert local_artifacts(dir_b, api_dir, dir_a) == []
    name = f"sparsegpt-job-{job_id}"
    assert s3.keys(BUCKET, f"{PREFIX}/artifacts/{job_id}/") == [
        f"{PREFIX}/artifacts/{job_id}/{name}.tar",
        f"{PREFIX}/artifacts/{job_id}/sparsegpt_report.json",
    ]
    with stack.client() as c:
        whole = c.get(job["artifact"]["url"])
        assert whole.status_code == 200 and whole.headers["x-checksum-sha256"] == job["artifact"]["sha256"]
        assert hashlib.sha256(whole.content).hexdigest() == job["artifact"]["sha256"]
        assert len(whole.content) == job["artifact"]["size"]
        with tarfile.open(fileobj=io.BytesIO(whole.content)) as tar:
            names = tar.getnames()
        assert f"{name}/config.json" in names and f"{name}/model.safetensors" in names
        part = c.get(job["artifact"]["url"], headers={"Range": "bytes=1000-4999"})
        assert part.status_code == 206 and part.content == whole.content[1000:5000]
        assert part.headers["content-range"] == f"bytes 1000-4999/{len(whole.content)}"
        tail = c.get(job["artifact"]["url"], headers={"Range": f"bytes={len(whole.content) - 10}-"})
        assert tail.status_code == 206 and tail.content == whole.content[-10:]
        # DELETE removes the objects; the upload goes once no job uses it.
        assert c.delete(f"/api/v1/jobs/{job_id}").status_code == 204
        assert s3.keys(BUCKET, f"{PREFIX}/artifacts/{job_id}/") == []
        assert c.delete(f"/api/v1/calibration-sets/{set_id}").status_code == 204
        assert s3.keys(BUCKET, f"{PREFIX}/uploads/") == []


def test_retention_deletes_in_the_store_and_the_download_answers_410(
    make_stack, redis_server, models_dir, s3, tmp_path
):
    """The sweeper (here its own process) expires an artifact: its objects go, the download is a 410;
    an object gone from the store behind the service's back is a 410 as well, never a broken stream."""
    import time

    from tests.support.processes import spawn

    stack = make_stack(redis_server.url, storage_url=f"s3://{BUCKET}/r", sweep_interval_s=0)  # the API sweeps not
    stack.env.update(s3.env())
    stack.start_api()
    start_worker(stack, "w", SPARSEGPT_DATA_DIR=str(tmp_path / "w"))
    with stack.client() as c:
        kept = c.post("/api/v1/jobs", json=job_body(models_dir)).json()["id"]
        expiring = c.post("/api/v1/jobs", json=job_body(models_dir)).json()["id"]
    for job_id in (kept, expiring):
        assert stack.wait(job_id, timeout=180)["status"] == "succeeded"
    s3.client().delete_object(Bucket=BUCKET, Key=f"r/artifacts/{kept}/sparsegpt-job-{kept}.tar")
    with stack.client() as c:
        gone = c.get(f"/api/v1/jobs/{kept}/artifact")
        assert gone.status_code == 410 and "no longer in the store" in gone.text
    # A sweeper process with a short retention: the other job's objects are deleted.
    sweeper = spawn(
        ["sweeper", "--interval=1"], {**stack.env, "SPARSEGPT_ARTIFACT_RETENTION_S": "1"}, stack.logs / "sweeper.log"
    )
    stack.workers.append(sweeper)
    deadline = time.monotonic() + 60
    while s3.keys(BUCKET, f"r/artifacts/{expiring}/") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert s3.keys(BUCKET, f"r/artifacts/{expiring}/") == [], sweeper.tail()
    with stack.client() as c:
        assert c.get(f"/api/v1/jobs/{expiring}/artifact").status_code == 410


def test_streamed_upload_in_several_parts_and_a_failure_leaves_nothing(s3, monkeypatch):
    """put_stream on the S3 server: 23 MiB in 5 MiB parts (four uploading at once) comes back whole,
    ranges included; a stream that fails midway leaves no object and no open multipart upload."""
    import os

    from app.storage import S3Store, StorageError

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    store = S3Store(f"s3://{BUCKET}/parts")
    data = os.urandom(23 * 2**20)
    url, size, sha = store.put_stream(
        "big.bin", (data[i : i + 300_000] for i in range(0, len(data), 300_000)), part_bytes=5 * 2**20
    )
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert b"".join(store.iter_range(url)) == data
    assert b"".join(store.iter_range(url, 7 * 2**20, 12 * 2**20 + 5)) == data[7 * 2**20 : 12 * 2**20 + 5]
    assert store.size(url) == len(data)

    def broken():
        yield data[: 11 * 2**20]
        raise OSError("disk read failed")

    with pytest.raises(OSError):
        store.put_stream("broken.bin", broken(), part_bytes=5 * 2**20)
    assert s3.keys(BUCKET, "parts/broken") == []
    assert not s3.client().list_multipart_uploads(Bucket=BUCKET, Prefix="parts/").get("Uploads")
    with pytest.raises(StorageError):
        list(store.iter_range(store.url("missing.bin")))


def test_a_workers_upload_cache_checks_sha256_and_forgets_old_files(s3, monkeypatch, tmp_path):
    import os

    from app.config import Settings
    from app.storage import StorageError, cached_upload, get_store

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None, data_dir=tmp_path, storage_url=f"s3://{BUCKET}/cache", upload_retention_s=3600)
    store = get_store(settings)
    text = b"some calibration text\n" * 100
    sha = hashlib.sha256(text).hexdigest()
    source = tmp_path / "src.txt"
    source.write_bytes(text)
    url = store.put_file(f"uploads/{sha}.txt", source)
    cached = cached_upload(settings, url)
    assert cached == tmp_path / "cache" / "uploads" / f"{sha}.txt" and cached.read_bytes() == text
    old = cached.parent / f"{'0' * 64}.txt"
    old.write_text("unused for two hours")
    os.utime(old, (os.path.getmtime(old) - 7200,) * 2)
    os.utime(cached, (os.path.getmtime(cached) - 7200,) * 2)  # old too, but used now: kept
    assert cached_upload(settings, url) == cached and not old.exists() and cached.exists()
    # An object whose content is not its name's sha256 is refused and not kept.
    liar = store.put_file(f"uploads/{'1' * 64}.txt", source)
    with pytest.raises(StorageError, match="does not match its sha256"):
        cached_upload(settings, liar)
    assert not (cached.parent / f"{'1' * 64}.txt").exists()
