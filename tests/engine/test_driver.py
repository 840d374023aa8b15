"""The block-by-block driver on tiny random models of five families."""

from __future__ import annotations

import math
import os

import pytest
import torch
import transformers
from torch.testing import assert_close

from tests.support.tiny_models import ARCHS, MORE_ARCHS, make_tiny_model, sample_text
from worker.engine.architectures import adapter_for, prunable_linears, weight_matrix
from worker.engine.calibration import evaluation_windows
from worker.engine.contract.spec import JobSpec
from worker.engine.errors import InvalidJob, JobCancelled
from worker.engine.pipeline import RunOptions, run_job


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("driver")
    (d / "cal.txt").write_text(sample_text(), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def models(workdir):
    return {arch: make_tiny_model(workdir / arch, arch) for arch in ARCHS}


# SPARSEGPT_TEST_DEVICE=cuda runs the driver tests on a GPU (still fp32, to compare exactly).
DEVICE = os.environ.get("SPARSEGPT_TEST_DEVICE", "cpu")


def job_for(model_dir, workdir, *, output=None, batch_size=None, **overrides) -> tuple[JobSpec, RunOptions]:
    """The spec (fields by their own names, see JobSpec.from_flat) and the run options."""
    fields = dict(
        model=str(model_dir),
        sparsity=0.5,
        dataset=str(workdir / "cal.txt"),
        nsamples=8,
        seqlen=64,
        datasets=[str(workdir / "cal.txt")],
        max_windows=4,
        dtype="float32",
    )
    fields.update(overrides)
    return JobSpec.from_flat(**fields), RunOptions(device=DEVICE, output=output, batch_size=batch_size)


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def direct_perplexity(model, windows: torch.Tensor) -> float:
    """The plain way: a whole-model forward per window, mean next-token CE, exp of the mean."""
    nlls = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0, :-1].float()
            nlls.append(torch.nn.functional.cross_entropy(logits, w[1:]).item())
    return math.exp(sum(nlls) / len(nlls))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_prune_save_reload(arch, sparsity, models, workdir, tmp_path):
    events = []
    out = tmp_path / "pruned"
    report = run_job(*job_for(models[arch], workdir, sparsity=sparsity, output=str(out)), on_progress=events.append)
    dense, pruned = load(models[arch]), load(out)

    # every Linear inside the blocks is pruned; embeddings and lm_head are untouched
    adapter = adapter_for(pruned)
    for i, block in enumerate(adapter.blocks):
        for name, module in prunable_linears(block).items():
            W = weight_matrix(module)
            assert (W == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), f"block {i} {name}"
            if sparsity == "2:4":
                assert torch.all((W == 0).reshape(W.shape[0], -1, 4).sum(-1) == 2)
    assert torch.equal(dense.get_input_embeddings().weight, pruned.get_input_embeddings().weight)
    assert torch.equal(dense.get_output_embeddings().weight, pruned.get_output_embeddings().weight)
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert len(report["layers"]) == sum(len(prunable_linears(b)) for b in adapter.blocks)

    # the block-by-block perplexities are the plain whole-model ones, before and after
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    windows = evaluation_windows(tokenizer, str(workdir / "cal.txt"), seqlen=64, max_windows=4)
    key = str(workdir / "cal.txt")
    assert report["dense_perplexity"][key] == pytest.approx(direct_perplexity(dense, windows), rel=1e-4)
    assert report["perplexity"][key] == pytest.approx(direct_perplexity(pruned, windows), rel=1e-4)

    # progress: stages in order, every block reported while pruning
    stages = [e["stage"] for e in events]
    assert stages[0] == "loading" and stages[-1] == "saving"
    assert {e["layer"] for e in events if e["stage"] == "pruning" and e["layer"] is not None} == set(
        range(len(adapter.blocks))
    )
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    # the model card says what the checkpoint is
    card = (out / "README.md").read_text()
    assert "dense checkpoint with zeros" in card and sparsity in card


def test_saved_model_reproduces_the_pruned_logits(models, workdir, tmp_path):
    """Saving and reloading changes nothing: logits equal those of the weights in the report."""
    out = tmp_path / "pruned"
    run_job(*job_for(models["llama"], workdir, output=str(out), datasets=[]))
    reloaded = load(out)
    again = load(out)
    ids = torch.randint(0, reloaded.config.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, again(ids).logits)
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(out / "model.safetensors"))
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q, reloaded.model.layers[0].self_attn.q_proj.weight)
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_methods_rank_by_reconstruction_error(method, models, workdir):
    report = run_job(*job_for(models["llama"], workdir, method=method, datasets=[]))
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    if method == "magnitude":
        assert all(layer["error"] is None for layer in report["layers"])
    else:
        assert all(0 < layer["error"] < 1 for layer in report["layers"])


def test_sparsegpt_error_is_lowest(models, workdir):
    errors = {}
    for method in ("sparsegpt", "wanda"):
        report = run_job(*job_for(models["opt"], workdir, method=method, datasets=[], last_block=0))
        errors[method] = sum(layer["error"] for layer in report["layers"])
    assert errors["sparsegpt"] < errors["wanda"]


def test_batched_forwards_give_the_same_weights(models, workdir, tmp_path):
    """Chunks of several sequences per block forward = one sequence per forward (the reference)."""
    outs = {}
    for batch in (1, 8):
        outs[batch] = tmp_path / f"b{batch}"
        run_job(*job_for(models["llama"], workdir, batch_size=batch, datasets=[], output=str(outs[batch])))
    a, b = load(outs[1]), load(outs[8])
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p == 0, q == 0), f"masks differ in {name}"
        assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_layer_selection(models, workdir, tmp_path):
    out = tmp_path / "sel"
    report = run_job(
        *job_for(models["llama"], workdir, first_block=1, exclude=["*.mlp.down_proj"], datasets=[], output=str(out))
    )
    names = {layer["name"] for layer in report["layers"]}
    assert all(n.startswith("model.layers.1.") for n in names)
    assert "model.layers.1.mlp.down_proj" not in names and "model.layers.1.self_attn.q_proj" in names
    dense, pruned = load(models["llama"]), load(out)
    assert torch.equal(dense.model.layers[0].self_attn.q_proj.weight, pruned.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(dense.model.layers[1].mlp.down_proj.weight, pruned.model.layers[1].mlp.down_proj.weight)


def test_cancellation_stops_between_modules(models, workdir, tmp_path):
    calls = []
    modules_seen = []

    def should_cancel():
        calls.append(1)
        return len(modules_seen) >= 2  # after the second module started pruning

    def on_progress(event):
        if event["stage"] == "pruning" and event["module"]:
            modules_seen.append(event["module"])

    out = tmp_path / "cancelled"
    with pytest.raises(JobCancelled):
        run_job(
            *job_for(models["llama"], workdir, output=str(out)), on_progress=on_progress, should_cancel=should_cancel
        )
    assert len(modules_seen) == 2
    assert not out.exists() and not list(tmp_path.glob(".cancelled*"))


def test_seqlen_beyond_context_is_refused(models, workdir):
    with pytest.raises(InvalidJob, match="longer than the model's context"):
        run_job(*job_for(models["gpt2"], workdir, seqlen=4096))


def test_default_seqlen_is_capped_by_the_context(models, workdir):
    report = run_job(*job_for(models["llama"], workdir, seqlen=None, nsamples=2, datasets=[], method="wanda"))
    assert report["calibration"]["seqlen"] == 256  # the tiny model's context, below 2048


@pytest.mark.parametrize("arch", MORE_ARCHS)
def test_other_families(arch, workdir, tmp_path):
    """Mistral, Qwen2, Gemma, Phi and Falcon through the same adapter: sparse, and the
    block-by-block perplexity equals the whole-model one."""
    model_dir = make_tiny_model(tmp_path / arch, arch)
    out = tmp_path / "pruned"
    report = run_job(*job_for(model_dir, workdir, sparsity="4:8", output=str(out)))
    pruned = load(out)
    for block in adapter_for(pruned).blocks:
        for name, module in prunable_linears(block).items():
            W = weight_matrix(module)
            assert torch.all((W == 0).reshape(W.shape[0], -1, 8).sum(-1) == 4), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    windows = evaluation_windows(tokenizer, str(workdir / "cal.txt"), seqlen=64, max_windows=4)
    assert report["perplexity"][str(workdir / "cal.txt")] == pytest.approx(direct_perplexity(pruned, windows), rel=1e-4)
