"""``sparsegpt prune`` end to end, as a subprocess, and its answers to bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from tests.support.paths import REPO
from tests.support.tiny_models import make_tiny_model, sample_text

SPARSEGPT = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make_tiny_model(d / "model", "llama")
    (d / "cal.txt").write_text(sample_text(), encoding="utf-8")
    (d / "empty.txt").write_text("", encoding="utf-8")
    lines = [json.dumps({"text": p}) for p in sample_text(20_000).split("\n\n") if p.strip()]
    (d / "cal.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return d


def prune(*args, cwd=None):
    return subprocess.run(
        [*SPARSEGPT, "prune", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300, cwd=cwd or REPO
    )


def test_prune_end_to_end(files, tmp_path):
    out, report_path = tmp_path / "pruned", tmp_path / "report.json"
    result = prune(
        files / "model",
        "--sparsity",
        "2:4",
        "--calibration",
        files / "cal.jsonl",
        "--nsamples",
        8,
        "--seqlen",
        64,
        "--eval",
        files / "cal.txt",
        "--eval-windows",
        3,
        "--device",
        "cpu",
        "--output",
        out,
        "--report",
        report_path,
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert "perplexity" in result.stdout and "dense safetensors checkpoint with zeros" in result.stdout
    report = json.loads(report_path.read_text())
    for key in ("dense_perplexity", "perplexity", "sparsity", "seconds", "peak_memory_bytes", "layers"):
        assert key in report
    assert set(report["seconds"]) >= {"prune", "eval", "total"}
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert {"name", "sparsity", "error", "seconds"} <= set(report["layers"][0])
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    q = model.model.layers[1].self_attn.q_proj.weight
    assert torch.all((q == 0).reshape(q.shape[0], -1, 4).sum(-1) == 2)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sparsity", "1.5"], "out of range"),
        (["--sparsity", "3:2"], "0 < N < M"),
        (["--calibration", "EMPTY"], "holds no text"),
        (["--seqlen", "4096"], "longer than the model's context"),
        (["--nsamples", "0"], "nsamples"),
        (["--calibration", "MISSING"], "does not exist"),
        (["--method", "obs"], "--method: Must be one of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(files, args, message):
    args = [
        str(files / "empty.txt") if a == "EMPTY" else str(files / "nope.txt") if a == "MISSING" else a for a in args
    ]
    result = prune(files / "model", "--calibration", files / "cal.txt", "--no-eval", "-q", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_missing_model_is_one_line_and_exit_2(tmp_path):
    result = prune(tmp_path / "no-such-model", "-q")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr


def test_summary_says_what_a_layer_selection_left_dense():
    from worker.engine.report_text import summary

    report = {
        "method": "sparsegpt",
        "pattern": "0.5",
        "sparsity": 0.5,
        "layers": [{}],
        "peak_memory_bytes": 0,
        "seconds": {"prune": 1.0, "total": 2.0},
        "perplexity": {},
        "dense_perplexity": {},
        "layers_selected": {"first_block": 1, "last_block": None, "include": [], "exclude": ["*.down_proj"]},
    }
    assert "layer selection (blocks 1..last; exclude *.down_proj): the modules it leaves out stay dense" in summary(
        report
    )
    report["layers_selected"] = {"first_block": None, "last_block": None, "include": [], "exclude": []}
    assert "layer selection" not in summary(report)


def test_a_hub_id_is_never_read_from_the_working_directory(tmp_path, monkeypatch):
    """load_model reads a path only when it is one (absolute, ./, ../, ~): a relative org/name
    that happens to exist beside the process is a Hub id, refused with the way to name it."""
    from worker.engine.checkpoint import load_model
    from worker.engine.errors import InvalidJob

    make_tiny_model(tmp_path / "outside" / "secretmodel")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidJob, match=r"read as a Hub id.*\./outside/secretmodel"):
        load_model("outside/secretmodel", dtype=torch.float32)
    model, _ = load_model("./outside/secretmodel", dtype=torch.float32)
    assert model.config.model_type == "llama"
