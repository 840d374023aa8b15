"""The model card (worker.engine.card) as the Hub reads it: huggingface_hub's own parser finds
base_model, the base model's license, library_name and the tags; the card names no path of the
machine that ran the job; and its reproduce command runs as written, giving the same model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, metadata_load

from tests.support.tiny_models import make_tiny_model, sample_text
from worker.engine.card import base_license, model_card, pattern_tag, quantization_scheme
from worker.engine.contract.report import Report
from worker.engine.contract.spec import JobSpec
from worker.engine.pipeline import RunOptions, run

REPO = Path(__file__).resolve().parents[2]
SPARSEGPT = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())"]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONPATH": str(REPO),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A job run as the worker runs it: server paths, an upload (content-addressed), the user's names."""
    root = tmp_path_factory.mktemp("server")
    model = make_tiny_model(root / "srv" / "models" / "tiny-llama")
    (model / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n\n# tiny\n", encoding="utf-8")
    text = sample_text(20_000)
    sha = hashlib.sha256(text.encode()).hexdigest()
    upload = root / "srv" / "data" / "uploads" / f"{sha}.txt"
    upload.parent.mkdir(parents=True)
    upload.write_text(text, encoding="utf-8")
    evaluation = root / "srv" / "data" / "eval.jsonl"
    evaluation.write_text(
        "\n".join(json.dumps({"text": p}) for p in sample_text(8_000).split("\n\n") if p.strip()), encoding="utf-8"
    )
    spec = JobSpec.model_validate(
        {
            "model": str(model),
            "sparsity": "2:4",
            "dtype": "float32",
            "calibration": {"dataset": str(upload), "nsamples": 4, "seqlen": 32},
            "evaluation": {"datasets": [str(evaluation)], "max_windows": 2},
        }
    )
    output = root / "srv" / "jobs" / "7" / "attempt-1.partial"
    labels = {str(upload): "upload:1", str(output): "sparsegpt-job-7"}  # the model: as submitted (its real path)
    report = run(spec, RunOptions(device="cpu", output=str(output), labels=labels))
    return root, model, upload, evaluation, output, report, sha


def test_the_hub_parser_reads_license_library_and_tags(served):
    _, model, _, _, output, _, _ = served
    card = ModelCard.load(output / "README.md")
    meta = metadata_load(output / "README.md")
    assert card.data.license == meta["license"] == "apache-2.0"  # carried from the base model's card
    assert card.data.library_name == meta["library_name"] == "transformers"
    assert card.data.base_model is None and "base_model" not in meta  # a local model is no Hub id
    assert {"sparsegpt", "2:4"} <= set(card.data.tags) == set(meta["tags"])
    assert [r.dataset_name for r in card.data.eval_results] == ["eval.jsonl"]


def test_the_card_names_no_server_path(served):
    root, model, upload, _, output, report, sha = served
    text = (output / "README.md").read_text()
    for path in (str(root), "/srv/", str(model), str(upload), ".partial", "upload:1"):
        assert path not in text, path
    assert "# tiny-llama pruned with sparsegpt (2:4)" in text and "sparsegpt prune ./tiny-llama " in text
    assert f"upload-{sha[:12]}.txt (sha256 {sha})" in text  # the calibration line
    assert f"`upload-{sha[:12]}.txt`: the uploaded file the job read, sha256 `{sha}`" in text
    assert report.files["upload:1"].sha256 == sha


def test_the_reproduce_command_runs_as_written(served, tmp_path):
    """Where the base model's directory and the data files are (checked by their sha256), the card's
    command runs and prunes the same model: the same perplexity."""
    _, model, upload, evaluation, output, report, sha = served
    text = (output / "README.md").read_text()
    [command] = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    (tmp_path / "tiny-llama").symlink_to(model, target_is_directory=True)
    for line in re.findall(r"- `([^`]+)`: the (?:uploaded )?file the job read, sha256 `([0-9a-f]{64})`", text):
        source = upload if line[0].startswith("upload-") else evaluation
        shutil.copy(source, tmp_path / line[0])
        assert hashlib.sha256((tmp_path / line[0]).read_bytes()).hexdigest() == line[1]
    argv = shlex.split(command)
    assert argv[:2] == ["sparsegpt", "prune"]
    result = subprocess.run(
        [*SPARSEGPT, *argv[1:], "--report", "again.json", "--quiet"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    again = Report.load(json.loads((tmp_path / "again.json").read_text()))
    assert again.pattern == report.pattern == "2:4"
    [(name, ppl)] = again.perplexity.items()
    assert Path(name).name == "eval.jsonl" and ppl == pytest.approx(report.perplexity[str(evaluation)], rel=1e-5)
    assert again.calibration.nsamples == 4 and again.calibration.seqlen == 32


def _hub_cache(cache: Path, repo: str, files: dict[str, str]) -> None:
    """huggingface_hub's cache layout for one snapshot of ``repo`` (refs/main -> snapshots/<commit>)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    for name, content in files.items():
        (folder / "snapshots" / commit / name).write_text(content, encoding="utf-8")


def test_a_hub_models_license_comes_from_its_cached_card_never_the_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    _hub_cache(
        tmp_path,
        "org/licensed",
        {
            "README.md": "---\nlicense: other\nlicense_name: tiny-license\n"
            "license_link: https://example.org/LICENSE\n---\n"
        },
    )
    _hub_cache(tmp_path, "org/configured", {"config.json": json.dumps({"license": "mit"})})
    report = {
        "model": "org/licensed",
        "method": "wanda",
        "pattern": "0.5",
        "sparsity": 0.5,
        "perplexity": {"wikitext2": 30.0},
        "dense_perplexity": {"wikitext2": 27.0},
        "spec": {"model": "org/licensed", "sparsity": 0.5, "method": "wanda"},
    }
    meta = metadata_load_text(model_card(report), tmp_path)
    assert meta["base_model"] == "org/licensed" and meta["license"] == "other"
    assert meta["license_name"] == "tiny-license" and meta["license_link"] == "https://example.org/LICENSE"
    assert {"sparsegpt", "wanda", "unstructured-50"} <= set(meta["tags"])
    assert base_license("org/configured") == {"license": "mit"}  # no card: its config says it
    assert base_license("org/not-cached") == {}  # not in the cache: no license rather than a request
    assert "license" not in metadata_load_text(model_card({**report, "model": "org/not-cached"}), tmp_path)


def metadata_load_text(card: str, directory: Path) -> dict:
    path = directory / "card.md"
    path.write_text(card, encoding="utf-8")
    return metadata_load(path)


@pytest.mark.parametrize(
    "pattern,tag",
    [
        ("2:4", "2:4"),
        ("4:8", "4:8"),
        ("0.5", "unstructured-50"),
        ("0.7", "unstructured-70"),
        ("50%", "unstructured-50"),
        ("", None),
    ],
)
def test_pattern_tag(pattern, tag):
    assert pattern_tag(pattern) == tag


def test_the_quantization_scheme_is_a_tag():
    base = {"model": "org/m", "method": "sparsegpt", "pattern": "2:4", "perplexity": {}}
    assert quantization_scheme(Report.load(base)) is None
    assert quantization_scheme(Report.load({**base, "quantization": {"scheme": "W4A16", "group_size": 128}})) == "W4A16"
    assert quantization_scheme(Report.load({**base, "quantization": {"scheme": "none"}})) is None
    assert quantization_scheme(Report.load({**base, "solver": {"wbits": 4}})) == "w4"
    card = ModelCard(model_card({**base, "quantization": {"scheme": "FP8_DYNAMIC"}}))
    assert {"sparsegpt", "2:4", "FP8_DYNAMIC"} <= set(card.data.tags)
