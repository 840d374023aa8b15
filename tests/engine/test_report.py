"""The typed report (worker.engine.contract.report): the engine sets every field of it and names each path as
its labels say, an old report and an old stored result load as before, and a field added to the
report reaches the card, the page's facts and the API's schema with no edit outside the report module."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from pydantic import Field

from tests.support.tiny_models import make_tiny_model, sample_text
from worker.engine.card import model_card
from worker.engine.contract.report import Report, Timings, facts, shown
from worker.engine.contract.spec import JobSpec
from worker.engine.pipeline import RunOptions, run
from worker.engine.report_text import summary

OLD_REPORT = Path(__file__).parent / "data" / "report_before_typing.json"  # written by the code before this module
# What a job row's result held before the worker stored the whole report (its hand-kept key list).
OLD_RESULT_KEYS = (
    "model",
    "method",
    "pattern",
    "sparsity",
    "sparsity_pruned_modules",
    "coverage",
    "experts",
    "seconds",
    "peak_memory_bytes",
    "environment",
    "profile",
    "refit",
    "zero_shot",
)


def keys(model: type[Report]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A run on server-like paths, with the names a user gave for each (as the worker passes them)."""
    root = tmp_path_factory.mktemp("server-side")
    model = make_tiny_model(root / "models" / "resolved-llama")
    (root / "uploads").mkdir()
    (root / "uploads" / "a1b2c3.txt").write_text(sample_text(20_000), encoding="utf-8")
    cal, ev = str(root / "uploads" / "a1b2c3.txt"), str(root / "real" / "eval.txt")
    (root / "real").mkdir()
    (root / "real" / "eval.txt").write_text(sample_text(8_000), encoding="utf-8")
    spec = JobSpec.model_validate(
        {
            "model": str(model),
            "sparsity": 0.5,
            "solver": {"refit": "reconstruct"},
            "calibration": {"dataset": cal, "nsamples": 4, "seqlen": 32},
            "evaluation": {"datasets": [cal, ev], "max_windows": 2},
            "dtype": "float32",
        }
    )
    output, tasks = root / "attempt-1.partial", root / "server-tasks"
    labels = {
        str(model): "/models/llama",
        cal: "upload:3",
        ev: "/data/eval.txt",  # a symlink's target -> as given
        str(output): "sparsegpt-job-7",
        str(tasks): "server-tasks",
    }
    report = run(spec, RunOptions(device="cpu", output=str(output), labels=labels, task_dirs=(str(tasks),)))
    return root, output, report


def test_the_engine_sets_every_field_and_names_paths_as_the_user_did(labelled):
    root, output, report = labelled
    assert report.model_fields_set == set(Report.model_fields)  # nothing left to a default
    assert report.model == "/models/llama" and report.output == "sparsegpt-job-7"
    assert report.calibration.dataset == "upload:3" and report.run.output == "sparsegpt-job-7"
    assert list(report.perplexity) == list(report.dense_perplexity) == ["upload:3", "/data/eval.txt"]
    assert list(report.evaluation.windows) == report.evaluation.datasets == ["upload:3", "/data/eval.txt"]
    assert report.spec["model"] == "/models/llama" and report.spec["calibration"]["dataset"] == "upload:3"
    assert report.run.task_dirs == ["server-tasks"]
    assert report.refit.mode == "reconstruct" and report.seconds.refit == report.refit.seconds
    # Written once, by the engine: the files hold the same report, and no path of the server
    written = (output / "sparsegpt_report.json").read_text()
    card = (output / "README.md").read_text()
    for text in (written, card, json.dumps(report.to_json())):
        assert str(root) not in text and ".partial" not in text
    on_disk = Report.model_validate(json.loads(written))
    assert on_disk.model_dump(exclude={"seconds"}) == report.model_dump(exclude={"seconds"})
    assert report.seconds.save >= on_disk.seconds.save > 0 and report.seconds.total >= on_disk.seconds.total
    # the card names the upload by its content and the eval file by its name, with no path (worker.engine.card)
    sha = hashlib.sha256((root / "uploads" / "a1b2c3.txt").read_bytes()).hexdigest()
    assert report.files["upload:3"].sha256 == sha and report.files["/data/eval.txt"].suffix == ".txt"
    assert [r.dataset_name for r in ModelCard(card).data.eval_results] == [f"upload-{sha[:12]}.txt", "eval.txt"]
    assert f"--calibration upload-{sha[:12]}.txt" in card and f"sha256 `{sha}`" in card and "| eval.txt |" in card
    assert "upload:3" not in card and "/data/eval.txt" not in card and "/models/llama" not in card


def test_a_report_from_before_the_typed_report_loads_as_it_was():
    old = json.loads(OLD_REPORT.read_text())
    report = Report.model_validate(old)
    assert report.to_dict() == old  # the same keys and values: the file format did not change
    assert report.profile.lambda_ == old["profile"]["lambda"] and report.layers[0].refit.error_before > 0
    assert report.experts[0].hessian == old["experts"][0]["hessian"]
    assert report.seconds.prune == old["seconds"]["prune"] and report.refit.layers == old["refit"]["layers"]
    assert "refit reconstruct: mean reconstruction error" in summary(old)  # the CLI's summary of a report file
    assert "## Sparsity per block" in model_card(old)


def test_a_stored_result_from_before_loads_and_a_broken_part_is_left_out():
    old = json.loads(OLD_REPORT.read_text())
    stored = {key: old[key] for key in OLD_RESULT_KEYS}  # what a job row held
    report = Report.load(stored)
    assert report.to_json() == stored and report.layers == [] and report.calibration is None
    broken = Report.load({**stored, "refit": {"layers": "many"}, "profile": 3})
    assert broken.refit is None and broken.profile is None and broken.model == old["model"]
    assert Report.load(None) is None and Report.load("text") is None


def test_a_non_finite_measure_is_null_in_json_and_nan_in_the_file():
    report = Report(perplexity={"wikitext2": math.inf}, seconds=Timings(prune=1.0))
    assert report.to_json() == {"perplexity": {"wikitext2": None}, "seconds": {"prune": 1.0}}
    assert report.to_dict()["perplexity"]["wikitext2"] == math.inf


class Extended(Report):
    """A report with one more field, declared only here: nothing else is edited."""

    energy_wh: float | None = shown(None, "energy used (Wh)", "card", "page")
    note: str | None = Field(None, description="not marked: the API's only")


def test_a_new_field_reaches_the_card_the_page_and_the_json():
    old = json.loads(OLD_REPORT.read_text())
    report = Extended.model_validate({**old, "energy_wh": 12.5, "note": "n"})
    fact = ("energy used (Wh)", "12.5")
    assert fact in facts(report, "card") and fact in facts(report, "page")
    assert "note" not in {label for label, _ in facts(report, "card")}
    assert "- Energy used (Wh): 12.5." in model_card(report)
    assert report.to_json()["energy_wh"] == 12.5 and keys(Extended) == keys(Report) | {"energy_wh", "note"}
