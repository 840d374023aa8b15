"""A quantizing job's two artifact formats (issue 26) over both stores: the saved directory holds
``compressed-tensors/`` and ``dense/`` (as the engine writes them with two formats), each packager
tars its own part under a name of its own, the default one first; the local store rebuilds them at
every read (whole and by range, against a direct computation), S3 keeps both tars and the report.
A job without quantization keeps hf-tar alone."""

from __future__ import annotations

import hashlib
import io
import secrets
import tarfile

import pytest

from app import archive, packagers
from app.config import Settings
from app.job_files import JobFiles
from app.storage import LocalStore
from tests.support.cluster import s3_bucket

BUCKET = "sparsegpt-quantized"
QUANTIZING = {"model": "m", "sparsity": 0.5, "quantization": {"scheme": "W4A16", "group_size": 32, "actorder": False}}


def saved_formats(files: JobFiles):
    final = files.attempt(1)
    for name, size in (("compressed-tensors", 9_000), ("dense", 30_000)):
        part = final / name
        part.mkdir(parents=True)
        (part / "config.json").write_text(f'{{"model_type": "llama", "format": "{name}"}}')
        (part / "model.safetensors").write_bytes(secrets.token_bytes(size))
        (part / "sparsegpt_report.json").write_text(f'{{"format": "{name}"}}')
    return final


def expected_tar(final, files: JobFiles, fmt: str) -> bytes:
    return b"".join(archive.iter_tar(final / fmt, f"{files.name}-{fmt}"))


def check_both(files: JobFiles, final, rows) -> None:
    assert [r["format"] for r in rows] == ["compressed-tensors", "dense"]
    for row in rows:
        packager = packagers.get(row["format"])
        expected = expected_tar(final, files, row["format"])
        assert (row["size"], row["sha256"]) == (len(expected), hashlib.sha256(expected).hexdigest())
        assert row["media_type"] == archive.MEDIA_TYPE
        whole = b"".join(files.store.read(row["path"], packager, files.name))
        assert whole == expected
        lo, hi = len(expected) // 4, len(expected) // 4 + 1500
        assert b"".join(files.store.read(row["path"], packager, files.name, lo, hi)) == expected[lo:hi]
        with tarfile.open(fileobj=io.BytesIO(whole)) as tar:  # its own directory only, under its own top
            assert sorted(tar.getnames()) == sorted(
                f"{files.name}-{row['format']}/{n}"
                for n in ("config.json", "model.safetensors", "sparsegpt_report.json")
            )
            config = tar.extractfile(f"{files.name}-{row['format']}/config.json").read()
            assert row["format"].encode() in config


def test_the_formats_a_job_gets():
    assert [p.format for p in packagers.for_job(QUANTIZING)] == ["compressed-tensors", "dense"]
    assert [p.format for p in packagers.for_job({**QUANTIZING, "quantization": None})] == ["hf-tar"]
    assert [p.format for p in packagers.for_job({"model": "m", "sparsity": 0.5})] == ["hf-tar"]
    assert packagers.default_for(QUANTIZING) == "compressed-tensors"
    assert packagers.default_for({"model": "m"}) == "hf-tar"
    assert packagers.engine_formats(QUANTIZING) == ("compressed-tensors", "dense")
    assert packagers.engine_formats({"model": "m"}) == ()
    ct, dense = packagers.get("compressed-tensors"), packagers.get("dense")
    assert (ct.file_name("sparsegpt-job-3"), dense.file_name("sparsegpt-job-3")) == (
        "sparsegpt-job-3-compressed-tensors.tar",
        "sparsegpt-job-3-dense.tar",
    )
    result = {
        "quantization": {
            "sizes": {
                "formats": {"compressed-tensors": {"bytes": 10, "ratio": 0.31}, "dense": {"bytes": 40, "ratio": 1.02}}
            }
        }
    }
    assert packagers.format_ratios(result) == {"compressed-tensors": 0.31, "dense": 1.02}
    assert packagers.format_ratios(None) == {} and packagers.format_ratios({"quantization": None}) == {}


def test_local_store_rebuilds_each_format_from_its_directory(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path)
    files = JobFiles(settings, 5)
    assert isinstance(files.store, LocalStore)
    final = saved_formats(files)
    rows = files.publish(final, packagers.for_job(QUANTIZING))
    assert {r["path"] for r in rows} == {str(final)}  # one directory, each format finds its part
    check_both(files, final, rows)
    files.keep_only(rows)
    assert sorted(p.name for p in files.dir.iterdir()) == ["attempt-1"]
    check_both(files, final, rows)  # still served after the cleanup of an attempt
    files.delete_all()
    assert not files.dir.exists()


@pytest.mark.slow
def test_s3_store_holds_both_tars_and_the_default_formats_report(tmp_path, monkeypatch):
    with s3_bucket(tmp_path / "s3", BUCKET) as s3:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        settings = Settings(_env_file=None, data_dir=tmp_path / "w", storage_url=f"s3://{BUCKET}/t")
        files = JobFiles(settings, 11)
        final = saved_formats(files)
        rows = files.publish(final, packagers.for_job(QUANTIZING))
        assert s3.keys(BUCKET, "t/artifacts/11/") == [
            "t/artifacts/11/sparsegpt-job-11-compressed-tensors.tar",
            "t/artifacts/11/sparsegpt-job-11-dense.tar",
            "t/artifacts/11/sparsegpt_report.json",
        ]
        report = s3.client().get_object(Bucket=BUCKET, Key="t/artifacts/11/sparsegpt_report.json")["Body"].read()
        assert report == (final / "compressed-tensors" / "sparsegpt_report.json").read_bytes()
        check_both(files, final, rows)
        files.keep_only(rows)
        assert not final.exists(), "the store has both: no copy on this machine"
        for row in rows:  # served from the store alone now
            data = b"".join(files.store.read(row["path"], packagers.get(row["format"]), files.name))
            assert hashlib.sha256(data).hexdigest() == row["sha256"]
        files.delete_all()
        assert s3.keys(BUCKET, "t/artifacts/11/") == []
