"""Quantization refused before anything is queued (issue 26), with the same reason in the API, the
form and the CLI: a group size that does not divide a quantized Linear's input width (from the
model's config.json: the 422 names the layers and the group sizes that would fit, the sentence of
spec_quant.group_size_message computed here directly), FP8_DYNAMIC with a group size, a scheme that
does not exist, quantization with solver.exact."""

from __future__ import annotations

import html
import json
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from app import db
from app.config import Settings
from app.main import create_app
from app.models import Job
from tests.support.paths import REPO
from worker.engine.contract.spec_quant import FP8_GROUP, WITH_EXACT, group_size_message


@pytest.fixture()
def client(tmp_path, models_dir):
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        redis_url="redis://127.0.0.1:6379/11",
        auth="off",
        local_dirs=str(models_dir),
        queue="test-quant-refusals",
    )  # no job may reach it
    with TestClient(create_app(settings), follow_redirects=False) as client:
        client.settings = settings
        yield client
    import redis

    redis.Redis.from_url(settings.redis_url).delete(settings.queue)  # the one job queued above


def body(models_dir, quantization, **changes):
    return {
        "model": str(models_dir / "llama"),
        "sparsity": 0.5,
        "quantization": quantization,
        "calibration": {"dataset": str(models_dir / "calib.txt"), "nsamples": 4, "seqlen": 32},
        "evaluation": {"datasets": []},
        **changes,
    }


def no_jobs(client) -> bool:
    with db.session_scope(client.settings.database) as session:
        return session.query(Job).count() == 0


def test_a_group_size_that_does_not_divide_a_layer_is_a_422_naming_them(client, models_dir):
    config = json.loads((models_dir / "llama" / "config.json").read_text())
    wide = 7  # divides no width of the tiny model
    expected = group_size_message(config, wide)
    assert expected and "group sizes that divide every layer" in expected
    refused = client.post("/api/v1/jobs", json=body(models_dir, {"scheme": "W4A16", "group_size": wide}))
    assert refused.status_code == 422, refused.text
    [error] = [e for e in refused.json()["detail"] if tuple(e["loc"][-2:]) == ("quantization", "group_size")]
    assert expected in error["msg"]
    # the form: by the group size's input, the same sentence
    form = {
        "model": str(models_dir / "llama"),
        "sparsity": "0.5",
        "calibration_source": "path",
        "calibration_path": str(models_dir / "calib.txt"),
        "nsamples": "4",
        "seqlen": "32",
        "quant_scheme": "W4A16",
        "quant_group_size": str(wide),
    }
    page = client.post("/jobs/new", data=form)
    assert page.status_code == 422 and expected in html.unescape(page.text)
    assert 'id="error-quant_group_size"' in page.text
    # one that divides them queues (here: into a queue no worker reads)
    fits = client.post("/api/v1/jobs", json=body(models_dir, {"scheme": "W4A16", "group_size": 32}))
    assert fits.status_code == 201, fits.text


@pytest.mark.parametrize(
    ("quantization", "changes", "field", "reason"),
    [
        ({"scheme": "FP8_DYNAMIC", "group_size": 128}, {}, "quant_group_size", FP8_GROUP.format(group_size=128)),
        ({"scheme": "W4A16"}, {"solver": {"exact": True}}, "", WITH_EXACT),
        ({"scheme": "W3A16"}, {}, "quant_scheme", "W4A16"),
    ],
)
def test_the_same_reason_in_the_api_the_form_and_the_cli(
    client, models_dir, tmp_path, quantization, changes, field, reason
):
    refused = client.post("/api/v1/jobs", json=body(models_dir, quantization, **changes))
    assert refused.status_code == 422 and reason in refused.text, refused.text

    form = {
        "model": str(models_dir / "llama"),
        "sparsity": "0.5",
        "calibration_source": "c4",
        "quant_scheme": quantization["scheme"],
        "quant_group_size": str(quantization.get("group_size", "")),
    }
    if changes.get("solver", {}).get("exact"):
        form["exact"] = "1"
    page = client.post("/jobs/new", data=form)
    assert page.status_code == 422 and reason in html.unescape(page.text)
    assert f'id="error-{field or "form"}"' in page.text  # by its input, or the form's own for a cross-field one

    args = ["--quantize", quantization["scheme"]] + (
        ["--group-size", str(quantization["group_size"])] if "group_size" in quantization else []
    )
    args += ["--exact"] if changes else []
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "prune",
            str(models_dir / "llama"),
            "--sparsity",
            "0.5",
            *args,
            "--output",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert cli.returncode == 2 and reason in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr and not (tmp_path / "out").exists()
    assert no_jobs(client)
