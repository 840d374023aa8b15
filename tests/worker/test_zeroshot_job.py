"""A job with zero-shot tasks (issue 12, item 3) through the API and a real Celery worker: the task
is a local lm-eval YAML task in the server's SPARSEGPT_EVAL_INCLUDE_DIRS; its dense and pruned
accuracy in the job's result equal a direct computation on the dense model and on the artifact;
the progress shows the evaluation stage; the job page and the compare page show the table; an
unknown task fails the job with the reason, a malformed name is a 422 at submit."""

from __future__ import annotations

import io
import re
import tarfile

import pytest
import torch
import transformers

from tests.support.processes import read_sse
from tests.support.zeroshot import TASK, accuracy, direct_picks, rows_right_on, weigh_blocks, write_choice_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zero_shot_model(models_dir):
    """A tiny LLaMA in the allowed directory whose blocks weigh in its answers (Linear weights x8),
    and the task's rows labelled so the dense model is right on 24 of 32 (accuracy 0.75)."""
    path = models_dir / "llama-zeroshot"
    if not path.exists():
        model = transformers.AutoModelForCausalLM.from_pretrained(models_dir / "llama", dtype=torch.float32)
        weigh_blocks(model)
        model.save_pretrained(path)
        transformers.AutoTokenizer.from_pretrained(models_dir / "llama").save_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    rows = rows_right_on(model, tokenizer, 32, 24)
    return path, rows


def body(model, **evaluation) -> dict:
    return {
        "model": str(model),
        "method": "magnitude",
        "sparsity": 0.9,
        "dtype": "float32",
        "evaluation": {"datasets": [], **evaluation},
    }


def artifact_model(client, job_id: int, directory):
    response = client.get(f"/api/v1/jobs/{job_id}/artifact")
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(directory, filter="data")
    config = next(directory.rglob("config.json"))
    return transformers.AutoModelForCausalLM.from_pretrained(config.parent, dtype=torch.float32)


def test_zero_shot_tasks_through_a_real_worker(make_stack, redis_server, zero_shot_model, tmp_path):
    path, rows = zero_shot_model
    tasks_dir = write_choice_task(tmp_path / "tasks", rows)
    stack = make_stack(redis_server.url, eval_include_dirs=str(tasks_dir))
    stack.start_api()
    worker = stack.start_worker("zeroshot")

    with stack.client() as client:
        refused = client.post("/api/v1/jobs", json=body(path, tasks=["piqa", "../tasks/x"]))
        assert refused.status_code == 422, refused.text
        assert "'../tasks/x' is not an lm-eval task name" in refused.text

        created = client.post("/api/v1/jobs", json=body(path, tasks=TASK, task_batch_size=4))
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        done = stack.wait(job_id, timeout=600)
        assert done["status"] == "succeeded", (done, worker.tail())

        zero_shot = done["result"]["zero_shot"]
        assert zero_shot["tasks"] == [TASK] and zero_shot["examples"] == {TASK: 32}
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        pruned_acc, pruned_norm = direct_picks(artifact_model(client, job_id, tmp_path / "artifact"), tokenizer, rows)
        dense_acc, _ = direct_picks(transformers.AutoModelForCausalLM.from_pretrained(path), tokenizer, rows)
        assert pruned_acc != dense_acc, "the pruned model answers differently: the check tells them apart"
        assert zero_shot["dense"][TASK]["acc"] == pytest.approx(0.75)
        assert zero_shot["pruned"][TASK]["acc"] == pytest.approx(accuracy(pruned_acc, rows))
        assert zero_shot["pruned"][TASK]["acc_norm"] == pytest.approx(accuracy(pruned_norm, rows))

        with client.stream("GET", f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "0"}) as stream:
            events = [e["data"] for e in read_sse(stream) if e["event"] == "progress"]
        messages = [e["message"] for e in events if e["stage"] == "evaluating"]
        assert any(m.startswith("dense zero-shot") for m in messages), messages
        assert any(m.startswith("pruned zero-shot") for m in messages), messages
        fractions = [e["fraction"] for e in events if e["fraction"] is not None]
        assert fractions == sorted(fractions)

        page = client.get(f"/jobs/{job_id}")
        assert page.status_code == 200, page.text[:300]
        table = re.search(r'<table class="metrics" id="zero-shot">.*?</table>', page.text, re.S).group(0)
        row = re.search(rf'<tr data-task="{TASK}" data-metric="acc">(.*?)</tr>', table, re.S).group(1)
        pruned_pct = f"{100 * accuracy(pruned_acc, rows):.2f}%"
        assert "75.00%" in row and pruned_pct in row, row

        unknown = client.post("/api/v1/jobs", json=body(path, tasks="sparsegpt_tiny_choise"))
        assert unknown.status_code == 201, unknown.text
        failed = stack.wait(unknown.json()["id"], timeout=300)
        assert failed["status"] == "failed"
        assert "unknown lm-eval task 'sparsegpt_tiny_choise'" in failed["error"], failed["error"]
        assert f"did you mean {TASK}" in failed["error"]

        compare = client.get(f"/compare?ids={job_id},{failed['id']}")
        assert compare.status_code == 200
        cells = re.search(rf'<tr data-task="{TASK}" data-metric="acc">(.*?)</tr>', compare.text, re.S).group(1)
        assert (
            f"75.00% → <strong>{pruned_pct}</strong>" in cells and ">failed<" in cells
        )  # the failed job: "failed", not a blank
