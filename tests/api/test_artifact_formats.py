"""Artifacts as rows with a format, one packager per format: a test-only packager registered here
gives a job a second artifact, listed in the job's JSON and on its page, downloadable whole and by
Range next to the default hf-tar (whose old route still answers); expiry and DELETE remove every
format. In-process on PostgreSQL with a Redis of its own (no worker: the job is finished here
through the same JobFiles.publish and crud.finish_job the worker calls)."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import crud, db, packagers
from app.job_files import JobFiles
from tests.support.stacks import InProcess, make_inprocess


class Manifest(packagers.Packager):
    """Test-only: each file's relative path and sha256, as JSON (the same bytes every time)."""

    format = "test-manifest"
    media_type = "application/json"
    extension = ".manifest.json"

    def stream(self, model_dir: Path, prefix: str) -> Iterator[bytes]:
        yield manifest_bytes(model_dir, prefix)


def manifest_bytes(model_dir: Path, prefix: str) -> bytes:
    """The direct computation the downloads are checked against."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    listing = {
        f"{prefix}/{p.relative_to(model_dir).as_posix()}": hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }
    return json.dumps(listing, indent=1, sort_keys=True).encode()


@pytest.fixture(scope="module")
def env(team_pg, module_redis, models_dir, tmp_path_factory):
    client, settings, tokens = make_inprocess(team_pg, module_redis, models_dir, tmp_path_factory)
    with client:
        yield InProcess(client, settings, tokens)


@pytest.fixture
def manifest_format():
    packager = packagers.register(Manifest())
    try:
        yield packager
    finally:
        packagers.unregister(packager.format)


def finished_job(env: InProcess) -> tuple[int, Path]:
    """A job claimed and finished the worker's way: its saved directory published in every
    registered format, the rows written by finish_job."""
    job_id = env.client.post(
        "/api/v1/jobs", json={"model": "facebook/opt-125m", "sparsity": 0.5}, headers=env.as_("alice")
    ).json()["id"]
    with db.session_scope(env.settings.database) as session:
        claim = crud.claim_job(
            session, job_id=job_id, worker="w@h", pid=1, stale_before=crud.stale_before(60), max_attempts=2
        )
        assert claim.claimed
        spec = dict(claim.job.spec)
    files = JobFiles(env.settings, job_id)
    final = files.attempt(1)
    final.mkdir(parents=True)
    (final / "config.json").write_text('{"model_type": "llama"}')
    (final / "model.safetensors").write_bytes(secrets.token_bytes(5000))
    rows = files.publish(final, packagers.for_job(spec))
    with db.session_scope(env.settings.database) as session:
        assert crud.finish_job(session, job_id=job_id, attempt=1, status="succeeded", artifacts=rows)
    files.keep_only(rows)
    return job_id, final


def test_a_second_format_is_one_packager(env, manifest_format):
    job_id, final = finished_job(env)
    name = f"sparsegpt-job-{job_id}"
    expected = manifest_bytes(final, name)
    h = env.as_("alice")
    job = env.client.get(f"/api/v1/jobs/{job_id}", headers=h).json()
    listed = {a["format"]: a for a in job["artifacts"]}
    assert list(listed) == ["hf-tar", "test-manifest"], job["artifacts"]
    assert listed["test-manifest"]["size"] == len(expected)
    assert listed["test-manifest"]["sha256"] == hashlib.sha256(expected).hexdigest()
    assert listed["test-manifest"]["media_type"] == "application/json"
    assert listed["test-manifest"]["file_name"] == f"{name}.manifest.json"
    # Today's fields stay: the default format's.
    assert job["artifact"]["sha256"] == listed["hf-tar"]["sha256"] and job["artifact"]["format"] == "tar"

    whole = env.client.get(listed["test-manifest"]["url"], headers=h)
    assert whole.status_code == 200 and whole.content == expected
    assert whole.headers["content-type"].startswith("application/json")
    assert whole.headers["x-checksum-sha256"] == hashlib.sha256(expected).hexdigest()
    assert f'filename="{name}.manifest.json"' in whole.headers["content-disposition"]
    part = env.client.get(listed["test-manifest"]["url"], headers={**h, "Range": "bytes=10-49"})
    assert part.status_code == 206 and part.content == expected[10:50]
    assert part.headers["content-range"] == f"bytes 10-49/{len(expected)}"
    past = env.client.get(listed["test-manifest"]["url"], headers={**h, "Range": f"bytes={len(expected)}-"})
    assert past.status_code == 416

    # The default format: by its name and by the old route, the same tar, its members the files.
    tar = env.client.get(f"/api/v1/jobs/{job_id}/artifacts/hf-tar", headers=h)
    assert tar.status_code == 200 and tar.content == env.client.get(job["artifact"]["url"], headers=h).content
    assert hashlib.sha256(tar.content).hexdigest() == listed["hf-tar"]["sha256"] == job["artifact"]["sha256"]
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        assert sorted(archive.getnames()) == [f"{name}/config.json", f"{name}/model.safetensors"]
    tail = env.client.get(f"/api/v1/jobs/{job_id}/artifacts/hf-tar", headers={**h, "Range": "bytes=-100"})
    assert tail.status_code == 206 and tail.content == tar.content[-100:]

    # The local store keeps one directory for both formats: nothing else was written.
    assert sorted(p.name for p in final.parent.iterdir()) == ["attempt-1"]

    # Unknown formats: 404 naming what the job has; a malformed name: 422; no such job: 404.
    missing = env.client.get(f"/api/v1/jobs/{job_id}/artifacts/onnx", headers=h)
    assert missing.status_code == 404 and "hf-tar, test-manifest" in missing.json()["detail"]
    assert env.client.get(f"/api/v1/jobs/{job_id}/artifacts/..%2Fx", headers=h).status_code in (404, 422)
    assert env.client.get(f"/api/v1/jobs/{job_id}/artifacts/Bad_Name", headers=h).status_code == 422
    assert env.client.get("/api/v1/jobs/999999/artifacts/hf-tar", headers=h).status_code == 404


def test_the_job_page_lists_each_format_with_its_size(env, manifest_format):
    job_id, final = finished_job(env)
    c = env.client
    assert c.post("/login", data={"token": env.tokens["alice"], "next": "/"}).status_code in (200, 303)
    try:
        page = c.get(f"/jobs/{job_id}")
    finally:
        c.cookies.clear()
    assert page.status_code == 200
    html = page.text
    assert 'id="artifact-formats"' in html
    for fmt in ("hf-tar", "test-manifest"):
        assert f'data-format="{fmt}"' in html and f"/api/v1/jobs/{job_id}/artifacts/{fmt}" in html
    size = len(manifest_bytes(final, f"sparsegpt-job-{job_id}"))
    assert f'data-bytes="{size}"' in html


def test_expiry_and_delete_remove_every_format(env, manifest_format):
    from app.sweeper import SweepReport, _expire_artifacts

    h = env.as_("alice")
    expiring, final = finished_job(env)
    settings = env.settings.model_copy(update={"artifact_retention_s": 1})
    with db.session_scope(env.settings.database) as session:  # finished long ago
        from datetime import timedelta

        from app.models import Job, utcnow

        session.get(Job, expiring).finished_at = utcnow() - timedelta(days=1)
    report = SweepReport()
    _expire_artifacts(settings, db.session_factory(env.settings.database), report)
    assert expiring in report.expired and not final.exists()
    with db.session_scope(env.settings.database) as session:
        rows = crud.get_job(session, expiring, details=True).artifacts
        assert len(rows) == 2 and all(r.expired_at is not None for r in rows)
    for fmt in ("hf-tar", "test-manifest"):
        assert env.client.get(f"/api/v1/jobs/{expiring}/artifacts/{fmt}", headers=h).status_code == 410
    assert env.client.get(f"/api/v1/jobs/{expiring}", headers=h).json()["artifacts"] == []

    deleted, final = finished_job(env)
    assert env.client.delete(f"/api/v1/jobs/{deleted}", headers=h).status_code == 204
    assert not final.parent.exists()
    with db.session_scope(env.settings.database) as session:
        assert crud.get_artifact(session, deleted, "hf-tar") is None  # the rows went with the job


def test_a_registered_format_must_have_a_new_plain_name():
    with pytest.raises(ValueError, match="registered already"):
        packagers.register(packagers.HfTar())
    bad = Manifest()
    bad.format = "Bad/Name"
    with pytest.raises(ValueError, match="lowercase"):
        packagers.register(bad)
    with pytest.raises(ValueError, match="default"):
        packagers.unregister(packagers.DEFAULT_FORMAT)
    assert packagers.formats()[0] == "hf-tar"


def test_a_job_recorded_without_rows_still_downloads_its_tar(env):
    """A job an older worker finished during an upgrade (the job's artifact columns only)."""
    from app.models import Artifact

    job_id, final = finished_job(env)
    h = env.as_("alice")
    before = env.client.get(f"/api/v1/jobs/{job_id}/artifact", headers=h).content
    with db.session_scope(env.settings.database) as session:
        for row in session.query(Artifact).filter_by(job_id=job_id):
            session.delete(row)
    after = env.client.get(f"/api/v1/jobs/{job_id}/artifact", headers={**h, "Range": "bytes=100-"})
    assert after.status_code == 206 and after.content == before[100:]
    assert env.client.get(f"/api/v1/jobs/{job_id}/artifacts/test-manifest", headers=h).status_code == 404
