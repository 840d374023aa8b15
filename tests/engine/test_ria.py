"""RIA (worker.engine.methods.ria) against a direct computation of its score and mask, and end to end:
the engine on a tiny LLaMA and on tiny MoE models, and a job through the service.

The direct computation works in float64 from the inputs themselves: ||X_j||_2 over the calibration
tokens, S_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||^0.5, and the mask by sorting
(the layer's int(rows * cols * s) lowest; N:M: the N lowest of each group of M inputs of a row).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile

import pytest
import torch
import transformers
from torch.testing import assert_close

from tests.engine.test_moe import direct_hessians
from tests.support.paths import REPO
from tests.support.stacks import SMALL
from tests.support.tiny_models import make_tiny_model, sample_text
from worker.engine.calibration import calibration_windows
from worker.engine.contract.method_table import METHOD_TABLE
from worker.engine.contract.patterns import parse_sparsity
from worker.engine.contract.spec import JobSpec
from worker.engine.contract.spec_fields import leaf_fields
from worker.engine.methods import METHODS, prune_layers
from worker.engine.methods.ria import ria_score
from worker.engine.moe import expert_matrix
from worker.engine.pipeline import RunOptions, run_job
from worker.engine.sequential import SolverSettings
from worker.engine.sparsegpt import Hessian

DEVICE = os.environ.get("SPARSEGPT_TEST_DEVICE", "cpu")
NSAMPLES, SEQLEN = 8, 32


def direct_score(W: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """RIA's score in float64 from ``sq_norms`` = ||X_j||^2 (cols,)."""
    A = W.double().abs()
    return (A / A.sum(1, keepdim=True) + A / A.sum(0, keepdim=True)) * sq_norms.double().sqrt().pow(0.5)


def direct_mask(S: torch.Tensor, sparsity) -> torch.Tensor:
    """True where RIA prunes, by sorting: the layer's lowest scores, or the N lowest of every M inputs."""
    pattern = parse_sparsity(sparsity)
    rows, cols = S.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if pattern.structured:
        for g in range(0, cols - cols % pattern.m, pattern.m):
            order = S[:, g : g + pattern.m].argsort(dim=1)[:, : pattern.n]
            mask[:, g : g + pattern.m].scatter_(1, order, True)
        return mask
    mask.view(-1)[S.flatten().argsort()[: int(rows * cols * pattern.sparsity)]] = True
    return mask


def assert_pruned_as(got: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor, *, agree: float = 1.0) -> None:
    """``got`` is ``dense`` with the ``mask`` positions zeroed (masks agreeing on at least ``agree``:
    fp32 statistics against float64 ones may swap a pair of scores that tie to the last bits)."""
    assert int((got == 0).sum()) == int(mask.sum()), "another count of zeros than the direct mask"
    same = ((got == 0) == mask).double().mean().item()
    assert same >= agree, same
    both_kept = (got != 0) & ~mask
    assert torch.equal(got[both_kept], dense.float()[both_kept])


def random_layer(rows=24, cols=64, seqs=4, tokens=16, seed=0):
    """A weight, its inputs X (seqs, tokens, cols) with features of unequal scale, and H = (2/seqs) X^T X."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(seqs, tokens, cols, generator=g) * torch.rand(cols, generator=g).mul(3).add(0.1)
    acc = Hessian(cols, "cpu")
    acc.add_batch(X)
    return W, X, acc.H


@pytest.mark.parametrize("sparsity", [0.5, 0.7, "2:4", "4:8"])
def test_ria_against_the_direct_score_and_mask(sparsity):
    W, X, H = random_layer()
    sq_norms = X.reshape(-1, X.shape[-1]).double().pow(2).sum(0)  # ||X_j||^2 over every token
    want = direct_mask(direct_score(W, sq_norms), sparsity)
    solver = SolverSettings(method="ria", pattern=parse_sparsity(sparsity))
    [got], [(error, loss, percdamp, refit)] = METHODS["ria"].prune([W], H, solver)
    assert_pruned_as(got, W, want)
    # the report's error: ||(W - W') X||^2 / ||W X||^2 over the calibration tokens
    x = X.reshape(-1, X.shape[-1]).double()
    direct_error = ((W.double() - got.double()) @ x.t()).pow(2).sum() / (W.double() @ x.t()).pow(2).sum()
    assert error == pytest.approx(direct_error.item(), rel=1e-4)
    assert (loss, percdamp, refit) == (None, 0.0, None)
    if not parse_sparsity(sparsity).structured:  # compared over the layer, not per row: rows differ
        assert len(set((got == 0).sum(1).tolist())) > 1


def test_the_score_from_the_hessian_is_the_exact_score_times_one_factor():
    """diag(H) = (2/n) ||X_j||^2 (n sequences): the engine's score is the direct one times (2/n)^(a/2)."""
    W, X, H = random_layer(seqs=4)
    sq_norms = X.reshape(-1, X.shape[-1]).double().pow(2).sum(0)
    ratio = ria_score(W, torch.diag(H)).double() / direct_score(W, sq_norms)
    assert_close(ratio, torch.full_like(ratio, (2 / 4) ** 0.25), rtol=1e-5, atol=0)


def test_a_zero_row_or_column_scores_zero_not_nan():
    W, _X, H = random_layer()
    W[3] = 0
    W[:, 5] = 0
    S = ria_score(W, torch.diag(H))
    assert not S.isnan().any() and torch.all(S[3] == 0) and torch.all(S[:, 5] == 0)


def test_the_refit_after_ria_keeps_its_mask_and_lowers_the_error():
    W, _X, H = random_layer()
    plain = SolverSettings(method="ria", pattern=parse_sparsity(0.5))
    refit = SolverSettings(method="ria", pattern=parse_sparsity(0.5), refit="reconstruct")
    [P], [(error, *_)], _ = prune_layers([W], H, plain)
    [R], [(after, _loss, _damp, record)], _ = prune_layers([W], H, refit)
    assert torch.equal(R == 0, P == 0)
    assert record["error_before"] == pytest.approx(error, rel=1e-5) and after < error


def test_the_registry_states_ria_and_the_spec_form_and_cli_offer_it():
    assert set(METHODS) == set(METHOD_TABLE) and METHODS["ria"].info is METHOD_TABLE["ria"]
    [method] = [leaf for leaf in leaf_fields() if leaf.path == ("method",)]
    assert "ria" in method.choices and method.ui.cli == "--method" and method.ui.form == "method"
    spec = JobSpec.model_validate(
        {"model": "org/name", "method": "ria", "sparsity": "2:4", "solver": {"refit": "swap+reconstruct"}}
    )
    assert spec.reads_calibration
    for solver, reason in (({"wbits": 4}, "solver.wbits"), ({"exact": True}, "solver.exact")):
        with pytest.raises(ValueError, match=reason):
            JobSpec.model_validate({"model": "org/name", "method": "ria", "sparsity": 0.5, "solver": solver})


def test_no_method_name_is_compared_outside_the_registry():
    """What a method needs and allows is asked of the table, not of its name."""
    compare = re.compile(r"""method\s*(==|!=)\s*["']|["'](sparsegpt|wanda|magnitude|ria)["']\s*(==|!=)\s*\w*method""")
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for package in ("app", "worker")
        for path in (REPO / package).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if compare.search(line)
    ]
    assert found == []


# --- end to end through the engine ---------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ria")
    (d / "cal.txt").write_text(sample_text(), encoding="utf-8")
    return d


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run_ria(model_dir, workdir, out, sparsity, **fields) -> dict:
    spec = JobSpec.from_flat(
        model=str(model_dir),
        method="ria",
        sparsity=sparsity,
        dataset=str(workdir / "cal.txt"),
        nsamples=NSAMPLES,
        seqlen=SEQLEN,
        datasets=[],
        dtype="float32",
        **fields,
    )
    return run_job(spec, RunOptions(device=DEVICE, output=str(out)))


def block0_linear_inputs(model, ids) -> dict[str, torch.Tensor]:
    """Every Linear of the dense model's block 0: what it reads over the calibration windows (tokens, in)."""
    block, seen, handles = model.model.layers[0], {}, []
    for name, m in block.named_modules():
        if isinstance(m, torch.nn.Linear):
            handles.append(
                m.register_forward_pre_hook(
                    lambda _m, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))
                )
            )
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


@pytest.fixture(scope="module")
def llama(workdir):
    return make_tiny_model(workdir / "llama", "llama")


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_tiny_llama_block0_against_the_direct_score(sparsity, llama, workdir, tmp_path):
    model_dir = llama
    report = run_ria(model_dir, workdir, tmp_path / "out", sparsity)
    assert report["method"] == "ria" and report["sparsity_pruned_modules"] == pytest.approx(0.5, abs=0.01)
    assert all(layer["error"] is not None and layer["error"] > 0 for layer in report["layers"])
    dense, pruned = load(model_dir), load(tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = calibration_windows(tokenizer, str(workdir / "cal.txt"), nsamples=NSAMPLES, seqlen=SEQLEN, seed=0)
    inputs = block0_linear_inputs(dense, ids)
    assert len(inputs) == 7  # q, k, v, o, gate, up, down
    for name, x in inputs.items():
        W = dense.model.layers[0].get_submodule(name).weight.detach()
        got = pruned.model.layers[0].get_submodule(name).weight.detach()
        assert_pruned_as(got, W, direct_mask(direct_score(W, x.double().pow(2).sum(0)), sparsity), agree=0.999)


@pytest.mark.parametrize("arch,sparsity", [("mixtral", "0.5"), ("qwen3_moe", "2:4")])
def test_moe_experts_against_the_direct_score_of_their_routed_tokens(arch, sparsity, workdir, tmp_path):
    """Each expert's matrix is one layer: RIA's sums over that expert's rows and columns, and the
    norms of the tokens the router sent it (the Hessians of tests/engine/test_moe.py's direct_hessians:
    H = (2/T) X^T X over its T tokens, so ||X_j||^2 = T/2 diag(H))."""
    model_dir = make_tiny_model(workdir / arch, arch)
    report = run_ria(model_dir, workdir, tmp_path / "out", sparsity, min_tokens=0)
    dense, pruned = load(model_dir), load(tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = calibration_windows(tokenizer, str(workdir / "cal.txt"), nsamples=NSAMPLES, seqlen=SEQLEN, seed=0)
    H_up, H_down, index = direct_hessians(dense, ids, every_token=False)
    assert report["experts"][0]["hessian"] == ["routed"] * len(H_up)
    for pname, hessians in (("gate_up_proj", H_up), ("down_proj", H_down)):
        for e, H in enumerate(hessians):
            tokens = int((index == e).any(-1).sum())
            W = expert_matrix(dense.model.layers[0].mlp.experts, pname, e).detach()
            got = expert_matrix(pruned.model.layers[0].mlp.experts, pname, e).detach()
            assert_pruned_as(got, W, direct_mask(direct_score(W, torch.diag(H) * tokens / 2), sparsity), agree=0.998)
    assert torch.equal(dense.model.layers[0].mlp.gate.weight, pruned.model.layers[0].mlp.gate.weight)


# --- a job through the service ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True, scope="session")
def test_a_ria_job_through_the_api(service, models_dir, tmp_path):
    """POST a job with method ria (the API, a real worker); the downloaded model's block 0 is RIA
    of the dense model on the job's calibration windows, and its report says ria."""
    calib = str(models_dir / "calib.txt")
    body = {
        "model": str(models_dir / "llama"),
        "method": "ria",
        "sparsity": "0.5",
        "dtype": "float32",
        "calibration": {"dataset": calib, **SMALL},
        "evaluation": {"datasets": []},
    }
    response = service.client.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job = service.wait_done(response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["spec"]["method"] == "ria" and job["result"]["method"] == "ria"
    download = service.client.get(job["artifact"]["url"])
    assert download.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    [report_file] = list(tmp_path.rglob("sparsegpt_report.json"))
    assert json.loads(report_file.read_text())["method"] == "ria"

    dense, pruned = load(models_dir / "llama"), load(report_file.parent)
    tokenizer = transformers.AutoTokenizer.from_pretrained(models_dir / "llama")
    ids = calibration_windows(tokenizer, calib, nsamples=SMALL["nsamples"], seqlen=SMALL["seqlen"], seed=0)
    for name, x in block0_linear_inputs(dense, ids).items():
        W = dense.model.layers[0].get_submodule(name).weight.detach()
        got = pruned.model.layers[0].get_submodule(name).weight.detach()
        assert_pruned_as(got, W, direct_mask(direct_score(W, x.double().pow(2).sum(0)), "0.5"), agree=0.999)
