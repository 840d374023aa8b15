"""Per-block checkpoints (worker.engine.resume): a run stopped at block k and run again with the
same checkpoint directory goes on at block k and ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from tests.engine.test_driver import job_for
from tests.support.tiny_models import make_tiny_model, sample_text
from worker.engine.errors import JobCancelled
from worker.engine.pipeline import run_job

BLOCKS = 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    (d / "cal.txt").write_text(sample_text(), encoding="utf-8")
    make_tiny_model(d / "llama", "llama", blocks=BLOCKS)
    return d


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def stop_at_block(k: int):
    """should_cancel for a run stopped when block k starts pruning (as a killed process would)."""
    seen = {"layer": None, "stage": None}

    def on_progress(event):
        seen.update(stage=event.get("stage"), layer=event.get("layer"))

    def should_cancel():
        return seen["stage"] == "pruning" and seen["layer"] == k

    return on_progress, should_cancel


@pytest.mark.parametrize("method,k", [("sparsegpt", 3), ("wanda", 1), ("magnitude", 4)])
def test_resume_gives_the_uninterrupted_weights(method, k, workdir, tmp_path, caplog):
    spec, options = job_for(workdir / "llama", workdir, method=method, output=str(tmp_path / "whole"))
    whole = run_job(spec, options)

    resume_dir = tmp_path / "checkpoints"
    spec, options = job_for(workdir / "llama", workdir, method=method, output=str(tmp_path / "resumed"))
    options.resume_dir = str(resume_dir)
    on_progress, should_cancel = stop_at_block(k)
    with pytest.raises(JobCancelled):
        run_job(spec, options, on_progress=on_progress, should_cancel=should_cancel)
    state = json.loads((resume_dir / "state.json").read_text())
    assert state["next_block"] == k and state["blocks"] == list(range(k))
    assert {r["block"] for r in state["results"]} == set(range(k))

    events = []
    with caplog.at_level(logging.INFO, logger="worker.engine.resume"):
        resumed = run_job(spec, options, on_progress=events.append)
    assert f"resuming at block {k} of {BLOCKS}" in caplog.text
    assert any(e["message"] == f"resuming at block {k} of {BLOCKS}" for e in events)
    pruning = [e["layer"] for e in events if e["stage"] == "pruning" and e.get("module")]  # a layer solved
    assert pruning[0] == k, "blocks before k are not pruned again"

    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    timeless = lambda layers: [{**r, "seconds": None} for r in layers]  # noqa: E731
    assert timeless(resumed["layers"]) == timeless(whole["layers"])  # the restored results are the run's own
    assert resumed["perplexity"] == whole["perplexity"] and resumed["sparsity"] == whole["sparsity"]
    assert "resume_dir" not in resumed["run"]


@pytest.mark.parametrize("arch, k", [("llama", 3), ("qwen3_moe", 2)])
def test_a_quantized_job_resumes_with_the_same_codes(arch, k, workdir, tmp_path):
    """Killed mid-way and run again: the blocks before k come back from their checkpoints with their
    codes and scales (experts too), and the compressed-tensors checkpoint saved is the uninterrupted one's,
    tensor for tensor (packed codes, scales), with the same report."""
    model = workdir / arch
    if not model.exists():
        make_tiny_model(model, arch, blocks=4)
    fields = dict(method="sparsegpt", scheme="W4A16", group_size=32)
    spec, options = job_for(model, workdir, output=str(tmp_path / "whole"), **fields)
    whole = run_job(spec, options)

    spec, options = job_for(model, workdir, output=str(tmp_path / "resumed"), **fields)
    options.resume_dir = str(tmp_path / "checkpoints")
    on_progress, should_cancel = stop_at_block(k)
    with pytest.raises(JobCancelled):
        run_job(spec, options, on_progress=on_progress, should_cancel=should_cancel)
    assert json.loads((tmp_path / "checkpoints" / "state.json").read_text())["next_block"] == k
    resumed = run_job(spec, options)

    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and any(name.endswith(".weight_packed") for name in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["perplexity"] == whole["perplexity"]
    drop = lambda q: {**q, "sizes": {**q["sizes"], "formats": None}}  # noqa: E731 (the reports' seconds differ)
    assert drop(resumed["quantization"]) == drop(whole["quantization"])
    assert whole["quantization"]["layers_quantized"] > 0


def test_another_job_does_not_take_up_the_checkpoint(workdir, tmp_path, caplog):
    resume_dir = tmp_path / "checkpoints"
    spec, options = job_for(workdir / "llama", workdir, output=None)
    options.resume_dir = str(resume_dir)
    on_progress, should_cancel = stop_at_block(2)
    with pytest.raises(JobCancelled):
        run_job(spec, options, on_progress=on_progress, should_cancel=should_cancel)
    assert (resume_dir / "state.json").exists()
    other, options = job_for(workdir / "llama", workdir, output=None, seed=7)  # other calibration windows
    options.resume_dir = str(resume_dir)
    events = []
    with caplog.at_level(logging.INFO, logger="worker.engine.resume"):
        run_job(other, options, on_progress=events.append)
    assert "resuming" not in caplog.text and "starting over" in caplog.text
    assert not any("resuming" in e["message"] for e in events)
    assert json.loads((resume_dir / "state.json").read_text())["next_block"] == BLOCKS


def test_cli_checkpoint_dir(workdir, tmp_path):
    """`sparsegpt prune --checkpoint-dir DIR`: every block checkpointed there; the same command
    again takes them up instead of pruning again, and saves the same weights."""
    from tests.engine.test_cli import prune

    args = [
        workdir / "llama",
        "--sparsity",
        "0.5",
        "--calibration",
        workdir / "cal.txt",
        "--nsamples",
        4,
        "--seqlen",
        32,
        "--device",
        "cpu",
        "--checkpoint-dir",
        tmp_path / "ck",
        "--no-eval",
        "--quiet",
    ]
    first = prune(*args, "--output", tmp_path / "a")
    assert first.returncode == 0, first.stderr
    state = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert state["next_block"] == BLOCKS and state["blocks"] == list(range(BLOCKS))
    again = prune(*args, "--output", tmp_path / "b")
    assert again.returncode == 0, again.stderr
    assert f"resuming at block {BLOCKS} of {BLOCKS}" in again.stderr
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["qwen2_moe", "gemma3_text"])
def test_resume_moe_and_mixed_attention(arch, workdir, tmp_path):
    """Fused experts (their per-expert records) and mixed attention resume to the same weights too."""
    if arch == "gemma3_text":
        from tests.engine.test_mixed_attention import tiny
        from tests.support.tiny_models import make_tokenizer

        tokenizer = make_tokenizer()
        model = tiny(arch, vocab_size=len(tokenizer))
        model.save_pretrained(tmp_path / arch)
        tokenizer.save_pretrained(tmp_path / arch)
        model_dir = tmp_path / arch
    else:
        model_dir = make_tiny_model(tmp_path / arch, arch, blocks=4)
    spec, options = job_for(model_dir, workdir, output=str(tmp_path / "whole"), datasets=[])
    whole = run_job(spec, options)
    spec, options = job_for(model_dir, workdir, output=str(tmp_path / "resumed"), datasets=[])
    options.resume_dir = str(tmp_path / "ck")
    on_progress, should_cancel = stop_at_block(2)
    with pytest.raises(JobCancelled):
        run_job(spec, options, on_progress=on_progress, should_cancel=should_cancel)
    resumed = run_job(spec, options)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["experts"] == whole["experts"] and resumed["sparsity"] == whole["sparsity"]
    assert arch != "qwen2_moe" or whole["experts"], "the experts were pruned and recorded"
