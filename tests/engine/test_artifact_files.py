"""The saved model directory a user gets: its config.json is the loaded model's (the engine's
run-time changes undone), its card is huggingface_hub metadata with the results and the way to
do it again, its report has the real save time, and its directories follow the umask."""

from __future__ import annotations

import json
import os
import shlex
import stat

import pytest
from huggingface_hub import ModelCard

from tests.support.tiny_models import make_tiny_model, sample_text
from worker.engine.card import accuracies, card_data, hub_id, model_card, reproduce_command
from worker.engine.cli import build_parser, spec_data
from worker.engine.contract.spec import JobSpec
from worker.engine.pipeline import RunOptions, run_job


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifact")
    model = make_tiny_model(root / "model")
    (root / "cal.txt").write_text(sample_text(20_000), encoding="utf-8")
    spec = JobSpec.model_validate(
        {
            "model": str(model),
            "sparsity": "2:4",
            "calibration": {"dataset": str(root / "cal.txt"), "nsamples": 4, "seqlen": 32},
            "evaluation": {"datasets": [str(root / "cal.txt")], "max_windows": 2},
            "dtype": "float32",
        }
    )
    old = os.umask(0o022)
    try:
        report = run_job(spec, RunOptions(device="cpu", output=str(root / "out" / "pruned")))
    finally:
        os.umask(old)
    return root, model, root / "out" / "pruned", report


def test_config_json_is_the_loaded_models(saved):
    _, model, out, _ = saved
    original = json.loads((model / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    assert original["use_cache"] is True  # the engine runs with it off
    changed = {k for k in original if original[k] != written.get(k)} - {"transformers_version"}
    assert not changed, {k: (original[k], written.get(k)) for k in changed}


def test_directories_follow_the_umask(saved):
    _, _, out, _ = saved
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o644


def test_report_holds_the_real_save_time(saved):
    _, _, out, report = saved
    written = json.loads((out / "sparsegpt_report.json").read_text())
    assert written["seconds"]["save"] > 0 and written["seconds"]["total"] >= written["seconds"]["save"]
    assert report["seconds"]["save"] >= written["seconds"]["save"]


def test_card_is_hub_metadata_for_a_local_model(saved):
    _, _, out, report = saved
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None  # a server path is not a base model
    [result] = card.data.eval_results
    assert result.metric_type == "perplexity" and result.metric_value == pytest.approx(
        next(iter(report["perplexity"].values())), rel=1e-3
    )
    assert card.data.library_name == "transformers" and "sparsegpt" in card.data.tags
    assert "dense checkpoint with zeros" in card.text and "2:4" in card.text and "sparsegpt prune" in card.text


def test_reproduce_command_gives_the_same_spec(saved):
    _, _, _, report = saved
    command = reproduce_command(report["spec"])
    argv = shlex.split(command)
    assert argv[:2] == ["sparsegpt", "prune"]
    again = JobSpec.model_validate(spec_data(build_parser().parse_args(argv[2:])))
    assert again.model_dump(mode="json") == report["spec"]
    profile = {
        **report["spec"],
        "sparsity": 0.6,
        "sparsity_profile": [0.5, 0.7],
        "solver": {**report["spec"]["solver"], "exact": True},
    }
    argv = shlex.split(reproduce_command(profile))
    assert JobSpec.model_validate(spec_data(build_parser().parse_args(argv[2:]))).model_dump(
        mode="json"
    ) == JobSpec.model_validate(profile).model_dump(mode="json")


def test_card_for_a_hub_model_with_zero_shot_accuracy():
    # the engine's zero_shot (worker.engine.zeroshot): task -> metric -> value, stderr beside; lm-eval's
    # own "acc,none" key is read too
    report = {
        "model": "facebook/opt-125m",
        "method": "sparsegpt",
        "pattern": "50%",
        "sparsity": 0.5,
        "perplexity": {"wikitext2": 30.5},
        "dense_perplexity": {"wikitext2": 27.6},
        "zero_shot": {
            "tasks": ["piqa", "arc_easy"],
            "examples": {"piqa": 50},
            "lm_eval": "0.4",
            "dense": {"piqa": {"acc": 0.62, "acc_stderr": 0.02, "acc_norm": 0.71}, "arc_easy": {"acc,none": 0.44}},
            "pruned": {"piqa": {"acc": 0.6, "acc_stderr": 0.02, "acc_norm": 0.69}, "arc_easy": {"acc,none": 0.41}},
        },
    }
    card = ModelCard(model_card(report))
    assert card.data.base_model == "facebook/opt-125m"
    got = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got == {("wikitext2", "perplexity"): 30.5, ("piqa", "accuracy"): 0.6, ("arc_easy", "accuracy"): 0.41}
    assert "## Zero-shot accuracy" in card.text and "| piqa | 0.6200 | 0.6000 |" in card.text
    assert accuracies(report) == {"piqa": {"pruned": 0.6, "dense": 0.62}, "arc_easy": {"pruned": 0.41, "dense": 0.44}}
    # a task measured dense only is no result of the pruned model
    assert accuracies({"zero_shot": {"dense": {"boolq": {"acc": 0.6}}, "pruned": {}}}) == {}
    assert card_data({"model": "/srv/models/x", "perplexity": {}}).eval_results is None


@pytest.mark.parametrize(
    "model,expected",
    [
        ("facebook/opt-125m", "facebook/opt-125m"),
        ("gpt2", "gpt2"),
        ("/srv/models/llama", None),
        ("./llama", None),
        ("~/m", None),
        ("upload:3", None),
        ("dir/model.gguf", None),
        ("a/b/c", None),
    ],
)
def test_hub_id(model, expected):
    assert hub_id(model) == expected
