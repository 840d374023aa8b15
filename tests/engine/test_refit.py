"""The refit after the prune (issue 12, item 2): on real Hessians of tiny random models and on planted
layers, for every pattern, it never raises a layer's reconstruction error tr(dW H dW^T) (computed
here directly, in float64), keeps N:M exact and every row's count of zeros; reconstruct is the exact
masked least-squares solution; swaps repair a bad mask. The option through the spec, the CLI, the
API and the form, with its refusals."""

from __future__ import annotations

import html
import os
import subprocess
import sys
import uuid

import pytest
import torch
import transformers

from tests.support.paths import REPO
from tests.support.tiny_models import make_tiny_model, sample_text
from worker.engine.architectures import adapter_for, prunable_linears, weight_matrix
from worker.engine.block_inputs import capture_block_inputs, run_block
from worker.engine.calibration import calibration_windows
from worker.engine.contract.patterns import parse_sparsity
from worker.engine.contract.spec import JobSpec
from worker.engine.methods.magnitude import magnitude_prune
from worker.engine.methods.wanda import wanda_prune
from worker.engine.pipeline import RunOptions, run_job
from worker.engine.refit import REFITS, refit_shared
from worker.engine.report_text import summary
from worker.engine.sequential import HessianCollector
from worker.engine.sparsegpt import sparsegpt_prune_shared

DEVICE = os.environ.get("SPARSEGPT_TEST_DEVICE", "cpu")  # as tests/engine/test_driver.py
PATTERNS = ["0.5", "2:4", "4:8", "0.7"]


def direct_error(W: torch.Tensor, P: torch.Tensor, H: torch.Tensor) -> float:
    D = (W.double() - P.double()).cpu()
    return torch.trace(D @ H.double().cpu() @ D.T).item()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("refit")
    (d / "cal.txt").write_text(sample_text(), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def groups(workdir):
    """Block 0 of a tiny LLaMA: (names, dense weights, H) per Hessian group (q/k/v, o, gate/up, down)."""
    path = make_tiny_model(workdir / "llama", "llama", blocks=2)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = calibration_windows(tokenizer, str(workdir / "cal.txt"), nsamples=16, seqlen=64, seed=0)
    adapter, device = adapter_for(model), torch.device(DEVICE)
    inputs = capture_block_inputs(model, adapter, ids, batch_size=8, device=device)
    block = adapter.blocks[0].to(device)
    modules = prunable_linears(block)
    collector = HessianCollector(modules, device)
    try:
        run_block(block, inputs, device, keep=False, after_chunk=collector.end_pass)
    finally:
        collector.remove()
    return [
        (names, [weight_matrix(modules[n]).detach().clone() for n in names], collector.hessians[owner].H)
        for owner, names in collector.groups.items()
    ]


def check_pattern(pruned: torch.Tensor, refitted: torch.Tensor, pattern) -> None:
    """Every row keeps its count of zeros; N:M: every full group of M has exactly N zeros."""
    assert torch.equal((pruned == 0).sum(1), (refitted == 0).sum(1))
    if pattern.structured:
        span = refitted.shape[1] // pattern.m * pattern.m
        zeros = (refitted[:, :span] == 0).reshape(refitted.shape[0], -1, pattern.m).sum(2)
        assert bool((zeros == pattern.n).all())


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("mode", ["reconstruct", "swap+reconstruct"])
@pytest.mark.parametrize("sparsity", PATTERNS)
def test_the_refit_never_raises_a_layers_error_and_keeps_the_pattern(groups, sparsity, mode, method):
    pattern = parse_sparsity(sparsity)
    total_before = total_after = 0.0
    for names, dense, H in groups:
        if method == "sparsegpt":
            pruned = [r.weight for r in sparsegpt_prune_shared(dense, H, pattern)]
        else:
            pruned = [wanda_prune(W, torch.diag(H), pattern) for W in dense]
        result = refit_shared(dense, pruned, H, pattern, mode=mode)
        for name, W, P, Q, before, after in zip(names, dense, pruned, result.weights, result.before, result.after):
            err_p, err_q = direct_error(W, P, H), direct_error(W, Q, H)
            assert err_q <= err_p * (1 + 1e-5) + 1e-9, (name, err_p, err_q)
            assert before == pytest.approx(err_p, rel=1e-3) and after == pytest.approx(err_q, rel=1e-3, abs=1e-6)
            check_pattern(P, Q, pattern)
            if mode == "reconstruct":
                assert torch.equal(P == 0, Q == 0)  # the mask is fixed
            total_before, total_after = total_before + err_p, total_after + err_q
    assert total_after < 0.99 * total_before  # and it does lower the error


def test_reconstruct_is_the_masked_least_squares_solution():
    """A planted layer: the refit's kept weights equal, row by row, w_S + Hd_SS^-1 Hd_SP w_P (float64)."""
    g = torch.Generator().manual_seed(3)
    cols, rows = 40, 6
    X = torch.randn(2000, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    H = X.T @ X / 2000
    W = torch.randn(rows, cols, generator=g)
    P = W * (torch.rand(rows, cols, generator=g) > 0.6)
    result = refit_shared([W], [P], H, parse_sparsity(0.6), mode="reconstruct", percdamp=0.01, iterations=200)
    Hd = H.double() + 0.01 * torch.diag(H).mean().double() * torch.eye(cols, dtype=torch.float64)
    for r in range(rows):
        keep, prune = P[r] != 0, P[r] == 0
        w = W[r].double()
        exact = w.clone()
        exact[prune] = 0
        exact[keep] += torch.linalg.solve(Hd[keep][:, keep], Hd[keep][:, prune] @ w[prune])
        got = result.weights[0][r].double()
        assert bool((got[prune] == 0).all())
        torch.testing.assert_close(got, exact, rtol=1e-2, atol=1e-2)
        objective = [((w - v) @ Hd @ (w - v)).item() for v in (got, exact, P[r].double())]
        assert objective[0] <= objective[1] * (1 + 1e-4) and objective[1] < objective[2]  # the optimum, reached
    assert result.after[0] < result.before[0]


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_swaps_repair_a_planted_bad_mask(sparsity):
    """Inputs with planted large scales on small weights: magnitude pruning drops exactly the weights that
    matter; the swaps regrow them (within the group for N:M) and the error falls far below what a refit
    on the fixed mask reaches."""
    g = torch.Generator().manual_seed(5)
    cols, rows = 64, 16
    scale = torch.ones(cols)
    important = torch.arange(0, cols, 4)  # one column in every group of 4
    scale[important] = 30.0
    X = torch.randn(4000, cols, generator=g) * scale
    H = X.T @ X / 4000
    W = torch.randn(rows, cols, generator=g)
    W[:, important] *= 0.2  # small weights on the loud inputs: magnitude prunes them
    pattern = parse_sparsity(sparsity)
    P = magnitude_prune(W, pattern)
    fixed = refit_shared([W], [P], H, pattern, mode="reconstruct")
    swapped = refit_shared([W], [P], H, pattern, mode="swap+reconstruct")
    assert swapped.swaps[0] > 0 and swapped.after[0] < 0.5 * fixed.after[0]
    check_pattern(P, swapped.weights[0], pattern)
    kept_important = (swapped.weights[0][:, important] != 0).float().mean().item()
    assert kept_important > 0.75 and (P[:, important] != 0).float().mean().item() < 0.1


def test_mode_none_changes_nothing(groups):
    names, dense, H = groups[0]
    pattern = parse_sparsity(0.5)
    pruned = [r.weight for r in sparsegpt_prune_shared(dense, H, pattern)]
    result = refit_shared(dense, pruned, H, pattern, mode="none")
    assert all(torch.equal(P, Q) for P, Q in zip(pruned, result.weights)) and result.before == result.after
    with pytest.raises(ValueError, match="refit must be one of"):
        refit_shared(dense, pruned, H, pattern, mode="swap")


def run(model_dir, workdir, **fields) -> dict:
    spec = JobSpec.from_flat(
        **{
            "model": str(model_dir),
            "dataset": str(workdir / "cal.txt"),
            "nsamples": 8,
            "seqlen": 64,
            "datasets": [],
            "dtype": "float32",
            **fields,
        }
    )
    return run_job(spec, RunOptions(device=DEVICE))


@pytest.mark.parametrize(
    "fields",
    [
        {"sparsity": 0.7, "sparsity_profile": "owl", "method": "sparsegpt", "refit": "swap+reconstruct"},
        {"sparsity": "2:4", "method": "sparsegpt", "refit": "reconstruct"},
        {"sparsity": "4:8", "method": "wanda", "refit": "swap+reconstruct"},
    ],
    ids=["owl-0.7-swap", "2:4-reconstruct", "wanda-4:8-swap"],
)
def test_a_job_with_a_refit_reports_it(workdir, fields):
    """Through run_job: every layer's error after <= before, the sparsity of each layer as without the
    refit, block 0's error before the refit = the plain run's (same inputs), seconds.refit."""
    path = make_tiny_model(workdir / "job", "llama", blocks=3)
    plain = run(path, workdir, **{**fields, "refit": "none"})
    fitted = run(path, workdir, **fields)
    assert plain["refit"]["layers"] == 0 and "refit" not in plain["seconds"]
    assert fitted["solver"]["refit"] == fields["refit"] and fitted["refit"]["mode"] == fields["refit"]
    assert fitted["refit"]["layers"] == len(fitted["layers"]) and fitted["seconds"]["refit"] > 0
    assert fitted["refit"]["error_after"] < fitted["refit"]["error_before"]
    for a, b in zip(plain["layers"], fitted["layers"]):
        assert a["name"] == b["name"] and b["sparsity"] == pytest.approx(a["sparsity"], abs=1e-12)
        assert b["error"] <= b["refit"]["error_before"] * (1 + 1e-5) + 1e-9
        if b["block"] == 0:
            assert b["refit"]["error_before"] == pytest.approx(a["error"], rel=1e-3)
    assert fitted["profile"]["achieved"] == pytest.approx(plain["profile"]["achieved"], abs=1e-12)


def test_fused_moe_experts_are_refit_each_with_its_own_hessian(workdir):
    """Each expert of a fused experts parameter (a tiny Mixtral's gate_up_proj, down_proj) is refit
    as a layer of its own, on the Hessian of the tokens routed to it: every pruned layer has a
    refit record, an expert parameter's error after the refit is at most the one before (its
    experts' mean), the zeros stay where the pattern wants them, and in block 0 (same inputs)
    the error before the refit is the plain run's."""
    path = make_tiny_model(workdir / "moe", "mixtral", blocks=2)
    plain = run(path, workdir, sparsity=0.5, method="sparsegpt")
    report = run(path, workdir, sparsity=0.5, method="sparsegpt", refit="reconstruct")
    experts = [r for r in report["layers"] if ".experts." in r["name"]]
    assert experts and all(r["refit"] is not None for r in report["layers"])
    assert report["refit"]["not_refit"] == [] and report["refit"]["layers"] == len(report["layers"])
    n_experts = transformers.AutoConfig.from_pretrained(path).num_local_experts
    for a, b in zip(plain["layers"], report["layers"]):
        assert a["name"] == b["name"] and b["sparsity"] == pytest.approx(a["sparsity"], abs=1e-12)
        assert b["error"] <= b["refit"]["error_before"] * (1 + 1e-5) + 1e-9, b
        if ".experts." in b["name"]:
            assert b["refit"]["experts"] == n_experts
            if b["block"] == 0:
                assert b["refit"]["error_before"] == pytest.approx(a["error"], rel=1e-3)
    assert sum(r["error"] for r in experts) < sum(r["refit"]["error_before"] for r in experts)
    assert "refit left alone" not in summary(report)


def test_the_spec_refuses_a_refit_where_it_cannot_apply():
    base = {"model": "org/name", "sparsity": 0.5}
    assert JobSpec(**base).solver.refit == "none" and set(REFITS) == {"none", "reconstruct", "swap+reconstruct"}
    reason = "solver.refit reconstruct needs the calibration Hessian"
    with pytest.raises(ValueError, match=reason):
        JobSpec(**base, method="magnitude", solver={"refit": "reconstruct"})
    with pytest.raises(ValueError, match=reason):
        JobSpec(**base, solver={"refit": "reconstruct", "wbits": 4})
    with pytest.raises(ValueError, match="literal_error|Input should be"):
        JobSpec(**base, solver={"refit": "swap"})
    assert JobSpec(**base, method="wanda", solver={"refit": "swap+reconstruct"}).solver.refit == "swap+reconstruct"


# --- the option through the CLI, the API and the form ------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.engine.cli", "org/name", "--sparsity", "0.5", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.main import create_app

    redis = os.environ.get("SPARSEGPT_TEST_REDIS_URL", "redis://127.0.0.1:6379/12")
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("refit-api"),
        redis_url=redis,
        auth="off",
        queue=f"refit-{uuid.uuid4().hex[:8]}",
    )
    with TestClient(create_app(settings)) as client:
        yield client


FORM = {
    "model": "org/name",
    "sparsity": "0.5",
    "method": "sparsegpt",
    "calibration_source": "c4",
    "eval_sets": "wikitext2",
    "dense": "1",
    "nsamples": "128",
    "seed": "0",
    "blocksize": "128",
    "percdamp": "0.01",
    "dtype": "auto",
}


@pytest.mark.parametrize(
    "args,body,form,reason",
    [
        (
            ["--refit", "swap"],
            {"solver": {"refit": "swap"}},
            {"refit": "swap"},
            "ust be one of 'none', 'reconstruct' or 'swap+reconstruct'",
        ),
        (
            ["--method", "magnitude", "--refit", "reconstruct"],
            {"method": "magnitude", "solver": {"refit": "reconstruct"}},
            {"method": "magnitude", "refit": "reconstruct"},
            "solver.refit reconstruct needs the calibration Hessian",
        ),
    ],
    ids=["bad-value", "magnitude"],
)
def test_a_bad_refit_is_refused_with_one_reason_everywhere(client, args, body, form, reason):
    result = cli(*args)
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and reason in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # usage line + the one error line, no traceback
    from worker.engine.contract.spec_fields import plain_message

    api = client.post("/api/v1/jobs", json={"model": "org/name", "sparsity": 0.5, **body})
    assert api.status_code == 422 and [reason in plain_message(e) for e in api.json()["detail"]] == [True], api.text
    page = client.post("/jobs/new", data={**FORM, **form})
    assert page.status_code == 422 and reason in html.unescape(page.text)


def test_the_refit_is_accepted_by_the_cli_the_api_and_the_form(client):
    from worker.engine.cli import build_parser, spec_data

    parsed = JobSpec.model_validate(
        spec_data(build_parser().parse_args(["org/name", "--sparsity", "2:4", "--refit", "swap+reconstruct"]))
    )
    assert parsed.solver.refit == "swap+reconstruct"
    created = client.post(
        "/api/v1/jobs", json={"model": "org/name", "sparsity": "2:4", "solver": {"refit": "swap+reconstruct"}}
    )
    assert created.status_code == 201, created.text
    assert created.json()["spec"]["solver"]["refit"] == "swap+reconstruct"
    page = client.get("/jobs/new")
    assert 'name="refit"' in page.text and 'value="swap+reconstruct"' in page.text
    posted = client.post("/jobs/new", data={**FORM, "sparsity": "2:4", "refit": "reconstruct"}, follow_redirects=False)
    assert posted.status_code == 303, posted.text
    job = client.get(f"/api/v1/jobs/{posted.headers['location'].rsplit('/', 1)[-1]}").json()
    assert job["spec"]["solver"]["refit"] == "reconstruct"


def test_the_cli_runs_a_refit_and_says_so(workdir, capsys):
    from worker.engine.cli import main

    path = make_tiny_model(workdir / "cli", "llama", blocks=2)
    code = main(
        [
            str(path),
            "--sparsity",
            "2:4",
            "--calibration",
            str(workdir / "cal.txt"),
            "--nsamples",
            "4",
            "--seqlen",
            "64",
            "--no-dense-eval",
            "--eval-windows",
            "1",
            "--eval",
            str(workdir / "cal.txt"),
            "--refit",
            "swap+reconstruct",
            "--device",
            DEVICE,
            "--dtype",
            "float32",
        ]
    )
    out = capsys.readouterr().out
    assert code in (0, None) and "refit swap+reconstruct: mean reconstruction error" in out, out
