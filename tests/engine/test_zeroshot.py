"""Zero-shot accuracy through lm-evaluation-harness (issue 12, item 3): the spec's
``evaluation.tasks``, the CLI's ``--eval-tasks``, a local task in the harness's YAML format, and
the harness's accuracy on the in-memory model held against a direct computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from pydantic import ValidationError

from tests.support.paths import REPO
from tests.support.tiny_models import make_tiny_model, sample_text
from tests.support.zeroshot import TASK, accuracy, direct_picks, rows_right_on, weigh_blocks, write_choice_task
from worker.engine.contract.spec import JobSpec

SPARSEGPT = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())"]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def prune(*args):
    return subprocess.run(
        [*SPARSEGPT, "prune", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=600, cwd=REPO
    )


# --- the spec ------------------------------------------------------------------------------------


def spec(**evaluation):
    return JobSpec.model_validate({"model": "org/m", "sparsity": 0.5, "evaluation": evaluation})


def test_tasks_are_split_on_commas_and_default_to_none():
    assert spec().evaluation.tasks == []
    assert spec(tasks="piqa, arc_easy").evaluation.tasks == ["piqa", "arc_easy"]
    assert spec(tasks=["piqa,arc_easy", "boolq"]).evaluation.tasks == ["piqa", "arc_easy", "boolq"]
    assert spec(tasks="").evaluation.tasks == []
    assert spec(tasks=["mmlu_abstract_algebra", "tmmluplus_education_(profession_level)"]).evaluation.tasks


@pytest.mark.parametrize(
    "value,message",
    [
        ("piqa,,boolq", "'' is not an lm-eval task name"),
        ("../etc/task", "is not an lm-eval task name"),
        ("/abs/task.yaml", "is not an lm-eval task name"),
        ("piqa,piqa", "must not repeat"),
        (",".join(f"t{i}" for i in range(33)), "at most 32"),
        ([1], "valid string"),
    ],
)
def test_bad_task_names_are_refused_with_the_reason(value, message):
    with pytest.raises(ValidationError) as err:
        spec(tasks=value)
    assert message in str(err.value)


@pytest.mark.parametrize("field,value", [("task_limit", 0), ("task_batch_size", 0), ("task_batch_size", 4096)])
def test_limit_and_batch_size_bounds(field, value):
    with pytest.raises(ValidationError):
        spec(**{field: value})


# --- the CLI, end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny LLaMA whose blocks weigh in its answers (their Linear weights scaled up: a random
    model's answers come from its embeddings otherwise, and pruning would change none), calibration
    text, and the local task whose labels make the dense model right on the first 24 questions and
    wrong on the last 8 (its accuracy is 0.75 by construction)."""
    d = tmp_path_factory.mktemp("zeroshot")
    make_tiny_model(d / "model", "llama")
    (d / "cal.txt").write_text(sample_text(), encoding="utf-8")
    model = transformers.AutoModelForCausalLM.from_pretrained(d / "model", dtype=torch.float32)
    weigh_blocks(model)
    model.save_pretrained(d / "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(d / "model")
    rows = rows_right_on(model, tokenizer, 32, 24)
    write_choice_task(d / "tasks", rows)
    return d, rows


def test_cli_reports_dense_and_pruned_accuracy_equal_to_a_direct_computation(files, tmp_path):
    d, rows = files
    out, report_path = tmp_path / "pruned", tmp_path / "report.json"
    result = prune(
        d / "model",
        "--method",
        "magnitude",
        "--sparsity",
        "0.9",
        "--no-eval",
        "--eval-tasks",
        TASK,
        "--eval-include",
        d / "tasks",
        "--eval-batch-size",
        5,
        "--device",
        "cpu",
        "--output",
        out,
        "--report",
        report_path,
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    zero_shot = report["zero_shot"]
    assert zero_shot["tasks"] == [TASK] and zero_shot["examples"] == {TASK: 32}
    assert zero_shot["batch_size"] == 5 and zero_shot["lm_eval"]

    dense = transformers.AutoModelForCausalLM.from_pretrained(d / "model", dtype=torch.float32)
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(d / "model")
    dense_acc, dense_norm = direct_picks(dense, tokenizer, rows)
    pruned_acc, pruned_norm = direct_picks(pruned, tokenizer, rows)
    assert accuracy(dense_acc, rows) == 0.75, "the labels were made so"
    assert pruned_acc != dense_acc, "pruning 90% changes some answers: the test tells the two models apart"

    assert zero_shot["dense"][TASK]["acc"] == pytest.approx(0.75)
    assert zero_shot["dense"][TASK]["acc_norm"] == pytest.approx(accuracy(dense_norm, rows))
    assert zero_shot["pruned"][TASK]["acc"] == pytest.approx(accuracy(pruned_acc, rows))
    assert zero_shot["pruned"][TASK]["acc_norm"] == pytest.approx(accuracy(pruned_norm, rows))
    assert zero_shot["pruned"][TASK]["acc_stderr"] > 0
    assert set(report["seconds"]) >= {"zero_shot_dense", "zero_shot_pruned"}
    assert f"zero-shot {TASK} acc: 0.7500 -> " in result.stdout
    # The saved model's card carries the pruned accuracy as model-index metadata.
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    found = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert found[(TASK, "accuracy")] == pytest.approx(round(accuracy(pruned_acc, rows), 4))


def test_cli_limit_and_no_dense(files, tmp_path):
    d, rows = files
    report_path = tmp_path / "report.json"
    result = prune(
        d / "model",
        "--sparsity",
        "2:4",
        "--method",
        "magnitude",
        "--no-eval",
        "--no-dense-eval",
        "--eval-tasks",
        TASK,
        "--eval-include",
        d / "tasks",
        "--eval-limit",
        7,
        "--device",
        "cpu",
        "--report",
        report_path,
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    zero_shot = json.loads(report_path.read_text())["zero_shot"]
    assert zero_shot["examples"] == {TASK: 7} and zero_shot["limit"] == 7
    assert zero_shot["dense"] == {} and set(zero_shot["pruned"][TASK]) >= {"acc", "acc_norm"}
    assert result.stdout.count("zero-shot") == 2 and " -> " not in result.stdout.split("zero-shot", 1)[1]


def test_cli_unknown_task_is_one_line_before_the_model_loads(files):
    d, _ = files
    result = prune(
        d / "model",
        "--sparsity",
        "0.5",
        "--no-eval",
        "--eval-tasks",
        "sparsegpt_tiny_choise",
        "--eval-include",
        d / "tasks",
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "unknown lm-eval task 'sparsegpt_tiny_choise'" in lines[0] and f"did you mean {TASK}" in lines[0]


def test_cli_bad_task_name_is_refused_before_torch(files):
    d, _ = files
    result = prune(d / "model", "--sparsity", "0.5", "--eval-tasks", "piqa,../x")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "sparsegpt prune: error: --eval-tasks: '../x' is not an lm-eval task name "
        "(letters, digits and _ - . + ( ), e.g. piqa or arc_easy)"
    )


# --- the harness on the model in memory ----------------------------------------------------------


def _harness_run(d, how: str, should_cancel=None):
    from worker.engine.architectures import adapter_for
    from worker.engine.progress import Tracker
    from worker.engine.zeroshot import ZeroShot

    model = transformers.AutoModelForCausalLM.from_pretrained(d / "model", dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(d / "model")
    model.pointers_before = {name: p.data_ptr() for name, p in model.named_parameters()}
    events: list[dict] = []
    tracker = Tracker(events.append, should_cancel, ["evaluating_tasks"])
    tracker.begin("evaluating_tasks", "zero-shot")
    zero_shot = ZeroShot([TASK], limit=None, batch_size=3, task_dirs=(str(d / "tasks"),))
    device = torch.device(os.environ.get("SPARSEGPT_TEST_DEVICE", "cpu"))
    result = zero_shot.evaluate(
        "dense", model, tokenizer, adapter_for(model), device=device, tracker=tracker, label="dense", how=how
    )
    return model, zero_shot, result, events


@pytest.mark.parametrize("how", ["whole", "streamed"])
def test_where_the_model_runs_changes_no_answer(files, how):
    """Whole on the device, or block by block (each block brought in by a hook for its own
    forward): the harness's answers are the direct computation's, no hook is left and every weight
    is back where it was, the very host tensors. Without a GPU both run on the CPU, which checks the hooks and the
    restore, not the transfers; SPARSEGPT_TEST_DEVICE=cuda checks those."""
    d, rows = files
    model, zero_shot, result, events = _harness_run(d, how)
    assert zero_shot.placement == how
    assert result[TASK]["acc"] == pytest.approx(0.75)  # the labels were made from the dense model's answers
    for block in model.model.layers:
        assert not block._forward_pre_hooks and not block._forward_hooks
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == model.pointers_before, (
        "the host tensors themselves are back (memory-mapped weights stay file pages), not copies"
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(d / "model")
    _, norm = direct_picks(model, tokenizer, rows)
    assert result[TASK]["acc_norm"] == pytest.approx(accuracy(norm, rows))
    assert {e["stage"] for e in events} == {"evaluating"}
    assert any(e["message"].startswith("dense zero-shot: ") and "requests" in e["message"] for e in events)


def test_a_cancel_stops_the_harness_between_batches(files):
    from worker.engine.errors import JobCancelled

    d, _ = files
    polls = []

    def should_cancel() -> bool:
        polls.append(1)
        return len(polls) > 3  # the stage's start, then a few batches

    with pytest.raises(JobCancelled):
        _harness_run(d, "whole", should_cancel)
    assert len(polls) == 4, "the harness stopped at the first check that said cancel"


def test_cli_missing_task_directory_is_one_line(files, tmp_path):
    d, _ = files
    result = prune(
        d / "model",
        "--sparsity",
        "0.5",
        "--no-eval",
        "--eval-tasks",
        TASK,
        "--eval-include",
        tmp_path / "nowhere",
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"sparsegpt prune: error: evaluation.tasks: the task directory "
        f"{tmp_path / 'nowhere'} does not exist (--eval-include, SPARSEGPT_EVAL_INCLUDE_DIRS)"
    )
