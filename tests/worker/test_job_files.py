"""JobFiles over both stores, the same calls: a job's directory published in two formats (the
default tar and a test-only packager), read back whole and by range against a direct
computation, the attempt directory kept only where the store serves from it, and the one cleanup
(partials, checkpoints, artifacts) leaving nothing, here and in the S3 store (moto's server)."""

from __future__ import annotations

import hashlib
import secrets

import pytest

from app import archive, packagers
from app.config import Settings
from app.job_files import JobFiles
from app.storage import LocalStore, StorageError, get_store
from tests.api.test_artifact_formats import Manifest, manifest_bytes
from tests.support.cluster import s3_bucket

BUCKET = "sparsegpt-jobfiles"


def saved_model(files: JobFiles, attempt: int = 1):
    final = files.attempt(attempt)
    final.mkdir(parents=True)
    (final / "config.json").write_text('{"model_type": "llama"}')
    (final / "model.safetensors").write_bytes(secrets.token_bytes(70_000))
    (final / "sparsegpt_report.json").write_text('{"model": "m"}')
    return final


def check_published(files: JobFiles, final, rows) -> None:
    tar = b"".join(archive.iter_tar(final, files.name))
    manifest = manifest_bytes(final, files.name)
    assert [r["format"] for r in rows] == ["hf-tar", "test-manifest"]
    for row, expected, packager in ((rows[0], tar, packagers.HfTar()), (rows[1], manifest, Manifest())):
        assert (row["size"], row["sha256"]) == (len(expected), hashlib.sha256(expected).hexdigest())
        assert files.store.holds(row["path"]) and files.store.intact(row["path"], row["size"])
        assert b"".join(files.store.read(row["path"], packager, files.name)) == expected
        lo, hi = len(expected) // 3, len(expected) // 3 + 777
        assert b"".join(files.store.read(row["path"], packager, files.name, lo, hi)) == expected[lo:hi]


def test_local_store_keeps_one_directory_and_cleans_up(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path)
    files = JobFiles(settings, 7)
    assert isinstance(files.store, LocalStore)
    final = saved_model(files)
    files.partial(2).mkdir()
    files.resume.mkdir()
    (files.resume / "state.json").write_text("{}")
    rows = files.publish(final, [packagers.HfTar(), Manifest()])
    assert {r["path"] for r in rows} == {str(final)}  # made again at each read: no second copy
    assert sorted(p.name for p in files.dir.iterdir()) == ["attempt-1", "attempt-2.partial", "resume"]
    check_published(files, final, rows)
    files.keep_only(rows)
    assert final.is_dir() and not files.resume.exists()
    files.remove_partials()
    assert not files.partial(2).exists() and files.dir.is_dir()  # the artifact keeps the directory
    # Only the store's own places are served or deleted, whatever a row says.
    assert not files.store.holds("/etc") and not files.store.holds(str(tmp_path / "sparsegpt.db"))
    with pytest.raises(StorageError):
        list(files.store.read("/etc", packagers.HfTar(), "x"))
    files.store.delete(str(tmp_path / "secret"))  # outside its areas: left alone
    files.delete_all()
    assert not files.dir.exists()
    assert (
        files.store.mirror(files.resume, files.checkpoints, named=lambda s: [], state="state.json", interval_s=1).pull()
        == 0
    )


def test_local_store_uploads_are_moved_in_and_removed(tmp_path):
    store = get_store(Settings(_env_file=None, data_dir=tmp_path))
    source = tmp_path / "incoming.txt"
    source.write_text("text")
    with store.locked():
        location = store.put_file("uploads/abc.txt", source)
    assert location == str(tmp_path.resolve() / "uploads" / "abc.txt") and not source.exists()
    assert store.local_file(location).read_text() == "text"
    with pytest.raises(StorageError, match="SPARSEGPT_STORAGE_URL"):
        store.local_file("s3://bucket/uploads/abc.txt")
    store.delete(location)
    assert not (tmp_path / "uploads" / "abc.txt").exists()
    with pytest.raises(ValueError):
        store.location("uploads/../secret_key")


@pytest.mark.slow
def test_s3_store_holds_every_format_and_nothing_stays_local(tmp_path, monkeypatch):
    with s3_bucket(tmp_path / "s3", BUCKET) as s3:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        settings = Settings(_env_file=None, data_dir=tmp_path / "w", storage_url=f"s3://{BUCKET}/t")
        files = JobFiles(settings, 9)
        final = saved_model(files)
        rows = files.publish(final, [packagers.HfTar(), Manifest()])
        assert s3.keys(BUCKET, "t/artifacts/9/") == [
            "t/artifacts/9/sparsegpt-job-9.manifest.json",
            "t/artifacts/9/sparsegpt-job-9.tar",
            "t/artifacts/9/sparsegpt_report.json",
        ]
        check_published(files, final, rows)
        files.keep_only(rows)
        assert not final.exists(), "the store has it: no copy on this machine"
        assert not files.store.intact(rows[0]["path"], rows[0]["size"] + 1)
        files.store.put_bytes("checkpoints/9/state.json", b"{}")
        files.remove_partials()
        assert s3.keys(BUCKET, "t/checkpoints/9/") == []
        files.delete_all()
        assert s3.keys(BUCKET, "t/artifacts/9/") == []
