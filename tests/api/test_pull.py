"""A job's artifact end to end over real HTTP: a worker prunes, the API serves byte ranges of the
archive (206 / 416, the whole archive's sha256), and ``sparsegpt pull`` resumes a partial file,
checks the sha256 and unpacks a directory whose report and card name what the user named."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard

from tests.support.paths import REPO
from tests.support.stacks import job_body

pytestmark = pytest.mark.slow


def pull(stack, *args, token: str | None = None, url_from_env: bool = False):
    env = {k: v for k, v in stack.env.items() if k not in ("SPARSEGPT_TOKEN", "SPARSEGPT_URL")}
    if token:
        env["SPARSEGPT_TOKEN"] = token
    server = ["--server", stack.base]
    if url_from_env:
        env["SPARSEGPT_URL"], server = stack.base, []
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "pull", *map(str, args), *server],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_range_and_pull(make_stack, module_redis, models_dir, tmp_path):
    stack = make_stack(module_redis.url)
    stack.start_api()
    stack.start_worker("pull")
    with stack.client() as c:
        upload = c.post(
            "/api/v1/calibration-sets", files={"file": ("notes.txt", (models_dir / "calib.txt").read_bytes())}
        )
        assert upload.status_code == 201, upload.text
        ref = upload.json()["ref"]
        body = job_body(
            models_dir,
            calibration={"dataset": ref, "nsamples": 4, "seqlen": 32},
            evaluation={"datasets": [ref], "max_windows": 2},
        )
        job_id = c.post("/api/v1/jobs", json=body).json()["id"]
    job = stack.wait(job_id)
    assert job["status"] == "succeeded", job["error"]
    size, sha, url = job["artifact"]["size"], job["artifact"]["sha256"], job["artifact"]["url"]

    with stack.client() as c:
        full = c.get(url)
        assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
        data = full.content
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha
        # ranges anywhere in the stream: inside a header, a file, the padding, the end marker
        for start, end in (
            (0, 0),
            (0, 511),
            (100, 5000),
            (size // 2, size - 1),
            (size - 1024, size - 1),
            (7, size + 100),
        ):
            part = c.get(url, headers={"Range": f"bytes={start}-{end}"})
            assert part.status_code == 206, (start, end, part.text)
            stop = min(end, size - 1)
            assert part.headers["content-range"] == f"bytes {start}-{stop}/{size}"
            assert part.content == data[start : stop + 1] and part.headers["x-checksum-sha256"] == sha
        assert c.get(url, headers={"Range": "bytes=-700"}).content == data[-700:]
        assert c.get(url, headers={"Range": f"bytes={size // 3}-"}).content == data[size // 3 :]
        refused = c.get(url, headers={"Range": f"bytes={size}-"})
        assert refused.status_code == 416 and refused.headers["content-range"] == f"bytes */{size}"
        several = c.get(url, headers={"Range": "bytes=0-10,20-30"})  # not served as ranges: the whole
        assert several.status_code == 200 and several.content == data
        stale = c.get(url, headers={"Range": "bytes=10-", "If-Range": '"0000"'})  # another version: the whole
        assert stale.status_code == 200 and stale.content == data

    # No token: one line saying what to set.
    refused = pull(stack, job_id, tmp_path / "x")
    assert refused.returncode == 1 and "SPARSEGPT_TOKEN" in refused.stderr and len(refused.stderr.splitlines()) == 1

    # A partial download resumes with a Range request and ends with the job's sha256.
    target = tmp_path / "model"
    (tmp_path / "model.tar.part").write_bytes(data[: size // 2])
    result = pull(stack, job_id, target, token=stack.token)
    assert result.returncode == 0, result.stderr
    assert f"resuming at byte {size // 2} of {size}" in result.stderr and sha in result.stdout
    assert not (tmp_path / "model.tar.part").exists()

    # A corrupt prefix is caught by the sha256 (so only the rest was fetched) and removed; again, it works.
    other = tmp_path / "again"
    (tmp_path / "again.tar.part").write_bytes(b"x" * 1000)
    bad = pull(stack, job_id, other, token=stack.token)
    assert bad.returncode == 1 and "sha256" in bad.stderr and not (tmp_path / "again.tar.part").exists()
    assert pull(stack, job_id, other, token=stack.token, url_from_env=True).returncode == 0
    assert pull(stack, job_id, other, token=stack.token).returncode == 1  # not into a non-empty directory

    # --format: the job lists its formats; the default one by name is the same archive, an unknown one
    # is refused in one line naming what the job has.
    listed = {a["format"]: a for a in job["artifacts"]}
    assert listed["hf-tar"]["sha256"] == sha and listed["hf-tar"]["size"] == size
    named = pull(stack, job_id, tmp_path / "by-format", "--format", "hf-tar", token=stack.token)
    assert named.returncode == 0 and sha in named.stdout, named.stderr
    assert (tmp_path / "by-format" / "model.safetensors").read_bytes() == (target / "model.safetensors").read_bytes()
    unknown = pull(stack, job_id, tmp_path / "nope", "--format", "onnx", token=stack.token)
    assert unknown.returncode == 1 and "no artifact in the format 'onnx' (it has: hf-tar" in unknown.stderr
    assert len(unknown.stderr.splitlines()) == 1 and not (tmp_path / "nope").exists()

    # What the user gets: the model, a card with metadata, a report naming what they named.
    assert {"config.json", "model.safetensors", "README.md", "sparsegpt_report.json"} <= {
        p.name for p in target.iterdir()
    }
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()
    report_text = (target / "sparsegpt_report.json").read_text()
    report = json.loads(report_text)
    assert ".partial" not in report_text and stack.env["SPARSEGPT_DATA_DIR"] not in report_text
    assert report["output"] == f"sparsegpt-job-{job_id}" and report["calibration"]["dataset"] == ref
    assert report["spec"]["evaluation"]["datasets"] == [ref] and list(report["perplexity"]) == [ref]
    assert report["model"] == body["model"] and report["seconds"]["save"] > 0
    card = ModelCard.load(target / "README.md")
    # the card names an upload by its content (upload-<sha256 prefix>), with its whole sha256 beside
    upload_sha = report["files"][ref]["sha256"]
    assert card.data.base_model is None and card.data.eval_results[0].dataset_name == f"upload-{upload_sha[:12]}.txt"
    assert upload_sha in card.content
    assert stack.env["SPARSEGPT_DATA_DIR"] not in card.content and ".partial" not in card.content
    config = json.loads((target / "config.json").read_text())
    assert config["use_cache"] == json.loads((models_dir / "llama" / "config.json").read_text())["use_cache"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
