"""``exact``: the engine reproduces the reference procedure's arithmetic bit for bit.

The yardstick is benchmarks/reference_sparsegpt.py, the plain reference procedure that the
benchmark measures the engine against (one sequence per forward, one running Hessian per
Linear, cholesky -> cholesky_inverse -> cholesky, the column loop). With the same model and
calibration windows, a job with ``solver.exact`` (worker.engine.reference) must give the very
same weights, and the default fast path the same up to float rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from benchmarks import reference_sparsegpt as reference
from tests.support.tiny_models import make_tiny_model, sample_text
from worker.engine.architectures import adapter_for, prunable_linears, weight_matrix
from worker.engine.contract.patterns import parse_sparsity
from worker.engine.contract.spec import JobSpec
from worker.engine.errors import InvalidJob
from worker.engine.pipeline import RunOptions, run_job
from worker.engine.reference import RunningHessian, reference_prune_shared

NSAMPLES, SEQLEN, BLOCKSIZE = 8, 64, 32  # hidden 64, MLP 128: two and four column blocks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("exact")
    (d / "cal.txt").write_text(sample_text(), encoding="utf-8")
    return make_tiny_model(d / "llama", "llama"), d / "cal.txt"


def reference_weights(model_dir: Path, calibration: Path, sparsity: str) -> dict[str, torch.Tensor]:
    model = reference.load_model(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    samples = reference.calibration_samples(reference.tokenize_file(tokenizer, calibration), NSAMPLES, SEQLEN, 0)
    reference.prune_sequential(model, samples, "sparsegpt", sparsity, blocksize=BLOCKSIZE, log=None)
    return block_weights(model)


def block_weights(model) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{name}": weight_matrix(m).clone()
        for i, block in enumerate(adapter_for(model).blocks)
        for name, m in prunable_linears(block).items()
    }


def engine_weights(model_dir: Path, calibration: Path, sparsity: str, out: Path, **fields) -> dict[str, torch.Tensor]:
    spec = JobSpec.from_flat(
        model=str(model_dir),
        sparsity=sparsity,
        dataset=str(calibration),
        nsamples=NSAMPLES,
        seqlen=SEQLEN,
        blocksize=BLOCKSIZE,
        datasets=[],
        dtype="float32",
        **fields,
    )
    report = run_job(spec, RunOptions(device="cpu", output=str(out)))
    assert all(layer["percdamp"] == 0.01 for layer in report["layers"])  # the dampening used, per layer
    return block_weights(transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))


@pytest.mark.parametrize("sparsity", ["0.5", "2:4", "4:8"])
def test_exact_gives_the_reference_weights_bit_for_bit(sparsity, setup, tmp_path):
    model_dir, calibration = setup
    expected = reference_weights(model_dir, calibration, sparsity)
    exact = engine_weights(model_dir, calibration, sparsity, tmp_path / "exact", exact=True)
    fast = engine_weights(model_dir, calibration, sparsity, tmp_path / "fast")
    assert exact.keys() == expected.keys() and len(expected) == 14
    for name, W in expected.items():
        assert torch.equal(exact[name], W), f"{name} differs from the reference procedure's"
    # the fast path (batched forwards, shared tiled Hessians, other factorization and loop)
    # differs by float rounding only: nearly every pruned position is the same
    for name, W in expected.items():
        agree = ((fast[name] == 0) == (W == 0)).float().mean().item()
        assert agree > 0.99, f"{name}: {agree:.4f} of the masks agree"


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_reference_module_gives_the_reference_layer_bit_for_bit(sparsity):
    """RunningHessian + reference_prune_shared against the reference's own layer class, no driver."""
    g = torch.Generator().manual_seed(2)
    layers = [nn.Linear(96, rows, bias=False) for rows in (40, 24)]  # two layers reading one input
    for layer in layers:
        layer.weight.data = torch.randn(layer.weight.shape, generator=g)
    ours = RunningHessian(96, "cpu")
    theirs = [reference.SparseGPTLayer(layer) for layer in layers]
    for _ in range(5):  # one sequence per forward, as the reference
        x = torch.randn(1, 30, 96, generator=g) * torch.linspace(0.1, 3, 96)
        ours.add_batch(x)
        for t in theirs:
            t.add_batch(x)
    assert torch.equal(ours.H, theirs[0].H)
    pattern = parse_sparsity(sparsity)
    results = reference_prune_shared([layer.weight.data for layer in layers], ours.H, pattern, blocksize=32)
    for t, layer, result in zip(theirs, layers, results):
        loss = t.prune(pattern.sparsity, pattern.n, pattern.m, blocksize=32)
        assert torch.equal(result.weight, layer.weight.data)
        assert result.loss == pytest.approx(loss) and result.percdamp == 0.01


def test_exact_is_refused_where_it_means_nothing(setup):
    model_dir, calibration = setup
    with pytest.raises(ValueError, match="exact"):
        JobSpec.from_flat(model=str(model_dir), sparsity=0.5, dataset=str(calibration), method="wanda", exact=True)
    spec = JobSpec.from_flat(model=str(model_dir), sparsity=0.5, dataset=str(calibration), exact=True)
    with pytest.raises(InvalidJob, match="exact"):
        run_job(spec, RunOptions(batch_size=4))
