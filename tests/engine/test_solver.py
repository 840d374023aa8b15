"""The one-layer solver against a naive implementation of the same algorithm, written here."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.testing import assert_close

from worker.engine.contract.patterns import parse_sparsity
from worker.engine.methods.magnitude import magnitude_prune
from worker.engine.methods.wanda import wanda_prune
from worker.engine.sparsegpt import Hessian, inverse_hessian_factor, sparsegpt_prune, sparsegpt_prune_shared


def make_inputs(rows=48, cols=256, tokens=600, seed=0):
    """Weights and correlated inputs whose features have very different scales (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    scales = torch.exp(torch.randn(cols, generator=g))  # some input features are much larger
    X = torch.randn(tokens, cols, generator=g) @ (
        torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5
    )
    return W, X * scales


def hessian_of(X: torch.Tensor, sequences: int = 4) -> torch.Tensor:
    h = Hessian(X.shape[1], "cpu")
    for part in X.reshape(sequences, -1, X.shape[1]):
        h.add_batch(part.unsqueeze(0))
    return h.H


def naive_sparsegpt(W, H, sparsity, n, m, blocksize, percdamp):
    """Algorithm 1 in float64, every OBS update applied at once to all later columns."""
    W = W.double().clone()
    H = H.double().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i in range(cols):
        if n == 0 and i % blocksize == 0:  # unstructured: choose the block's mask from the current W
            j = min(i + blocksize, cols)
            score = W[:, i:j] ** 2 / torch.diag(U)[i:j] ** 2
            k = int(score.numel() * sparsity)
            mask[:, i:j] = score <= score.flatten().sort().values[k]
        if n and i % m == 0:  # N:M: the n lowest scores of each row's group, from the running W
            score = W[:, i : i + m] ** 2 / torch.diag(U)[i : i + m] ** 2
            low = score.argsort(dim=1)[:, :n]
            mask[:, i : i + m].scatter_(1, low, True)
        q = torch.where(mask[:, i], torch.zeros_like(W[:, i]), W[:, i])
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
        W[:, i] = q
    return W.float(), mask


@pytest.mark.parametrize("pattern,blocksize", [("0.5", 128), ("0.5", 64), ("0.7", 128), ("2:4", 128), ("4:8", 64)])
def test_solver_matches_naive_algorithm(pattern, blocksize):
    W, X = make_inputs()
    H = hessian_of(X)
    p = parse_sparsity(pattern)
    result = sparsegpt_prune(W, H, p, blocksize=blocksize, percdamp=0.01)
    expected, mask = naive_sparsegpt(W, H, p.sparsity, p.n, p.m, blocksize, 0.01)
    assert torch.equal(result.weight == 0, mask), "the pruned positions differ from the naive algorithm's"
    assert_close(result.weight, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_structure_is_exact(pattern):
    W, X = make_inputs(cols=128)
    p = parse_sparsity(pattern)
    pruned = sparsegpt_prune(W, hessian_of(X), p).weight
    zeros_per_group = (pruned == 0).reshape(W.shape[0], -1, p.m).sum(-1)
    assert torch.all(zeros_per_group == p.n)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_unstructured_sparsity_is_achieved(sparsity):
    W, X = make_inputs()
    pruned = sparsegpt_prune(W, hessian_of(X), parse_sparsity(sparsity), blocksize=128).weight
    achieved = (pruned == 0).float().mean().item()
    # the reference's `<=` rule drops floor(N*s)+1 per block of N weights
    assert sparsity <= achieved <= sparsity + 2 / (W.shape[0] * 128) + 1e-9


def output_error(W, P, X):
    return ((X @ (W - P).T) ** 2).sum() / ((X @ W.T) ** 2).sum()


@pytest.mark.parametrize("pattern", ["0.5", "2:4", "4:8"])
def test_sparsegpt_beats_wanda_beats_magnitude(pattern):
    W, X = make_inputs(seed=3)
    H = hessian_of(X)
    p = parse_sparsity(pattern)
    result = sparsegpt_prune(W, H, p)
    e_sparsegpt = output_error(W, result.weight, X)
    e_wanda = output_error(W, wanda_prune(W, torch.diag(H), p), X)
    e_magnitude = output_error(W, magnitude_prune(W, p), X)
    assert e_sparsegpt < e_wanda < e_magnitude
    # the solver's own error estimate is the output error on the calibration data
    assert result.error == pytest.approx(e_sparsegpt.item(), rel=1e-3)


@pytest.mark.parametrize("cols", [150, 256, 1100])  # one tile; 2 and 6 tiles a side of the symmetric product
def test_hessian_follows_the_reference_running_average(cols):
    _, X = make_inputs(cols=cols, tokens=480)
    batches = X.reshape(6, 2, 40, -1)  # 6 batches of 2 sequences of 40 tokens
    ours = Hessian(X.shape[1], "cpu")
    H = torch.zeros(X.shape[1], X.shape[1])
    n = 0
    for b in batches:  # the reference's add_batch, written out
        inp = b.reshape(-1, X.shape[1]).t().float()
        H *= n / (n + 2)
        n += 2
        inp = (2 / n) ** 0.5 * inp
        H += inp @ inp.t()
        ours.add_batch(b)
    assert ours.nsamples == 12
    assert_close(ours.H, H, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_shared_hessian_solve_equals_separate_solves(pattern):
    _, X = make_inputs()
    H = hessian_of(X)
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(r, X.shape[1], generator=g) for r in (48, 16, 16)]
    p = parse_sparsity(pattern)
    together = sparsegpt_prune_shared(weights, H, p)
    for W, shared in zip(weights, together):
        alone = sparsegpt_prune(W, H, p)
        assert torch.equal(shared.weight, alone.weight)
        assert shared.loss == pytest.approx(alone.loss)
        assert shared.error == pytest.approx(alone.error)


def test_inputs_are_not_modified_and_dead_inputs_are_zeroed():
    W, X = make_inputs()
    X[:, 5] = 0  # an input feature that is always zero
    H = hessian_of(X)
    W0, H0 = W.clone(), H.clone()
    pruned = sparsegpt_prune(W, H, parse_sparsity(0.5)).weight
    assert torch.equal(W, W0) and torch.equal(H, H0)
    assert torch.all(pruned[:, 5] == 0)


def test_joint_quantization_keeps_zeros_on_a_grid():
    W, X = make_inputs()
    result = sparsegpt_prune(W, hessian_of(X), parse_sparsity("2:4"), wbits=3)
    P = result.weight
    assert torch.all((P == 0).reshape(W.shape[0], -1, 4).sum(-1) >= 2)
    for row in P:
        assert row.unique().numel() <= 2**3  # 3-bit grid (0 is on it)
    assert 0 < result.error < 1


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_inverse():
    _, X = make_inputs(cols=200)
    H = hessian_of(X)
    U, percdamp, damp = inverse_hessian_factor(H.clone(), 0.01)
    assert percdamp == 0.01
    H64 = H.double() + damp * torch.eye(200, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(H64), upper=True)
    assert torch.equal(U, torch.triu(U)) and bool((torch.diag(U) > 0).all())
    assert_close(U.double(), expected, rtol=1e-3, atol=1e-5 * expected.abs().max().item())


def test_cholesky_failure_retries_with_more_dampening(caplog):
    g = torch.Generator().manual_seed(1)
    H = torch.eye(64)
    H[0, 0] = -0.05  # indefinite: 1% dampening is not enough, 10% is
    with caplog.at_level(logging.WARNING):
        result = sparsegpt_prune(torch.randn(4, 64, generator=g), H, parse_sparsity(0.5), percdamp=0.01)
    assert result.percdamp > 0.01
    assert "Cholesky failed" in caplog.text


def test_bad_patterns_are_refused():
    from worker.engine.errors import InvalidJob

    for bad in ["3:2", "0:4", "1.5", "0", "abc", 1.5, -0.1, "4:4"]:
        with pytest.raises(InvalidJob):
            parse_sparsity(bad)
    assert str(parse_sparsity("2:4")) == "2:4" and parse_sparsity("50%").sparsity == 0.5


@pytest.mark.parametrize("pattern", ["0.5", "0.3", "2:4", "4:8"])
@pytest.mark.parametrize("blocksize", [128, 32])
def test_solved_blocks_equal_the_column_loop(pattern, blocksize):
    """The fast path (batched triangular solves) gives the reference loop's masks and weights."""
    W, X = make_inputs(rows=64, cols=320, seed=5)
    H = hessian_of(X)
    p = parse_sparsity(pattern)
    fast = sparsegpt_prune_shared([W[:40], W[40:]], H, p, blocksize=blocksize, column_loop=False)
    loop = sparsegpt_prune_shared([W[:40], W[40:]], H, p, blocksize=blocksize, column_loop=True)
    for a, b in zip(fast, loop):
        assert torch.equal(a.weight == 0, b.weight == 0)
        assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-4)
        assert a.loss == pytest.approx(b.loss, rel=1e-4)


@pytest.mark.parametrize("exact", [False, True])
def test_the_dampening_used_reaches_the_layer_report(exact):
    """A Hessian that needed more dampening says so in its layers' results (fast and reference arithmetic)."""
    from torch import nn

    from worker.engine.sequential import LayerResult, SolverSettings, solve_group, sparsegpt_arithmetic

    H = torch.eye(64)
    H[0, 0] = -0.05  # indefinite: 1% dampening is not enough, 10% is
    modules = {"a": nn.Linear(64, 8), "b": nn.Linear(64, 4)}
    solver = SolverSettings(method="sparsegpt", pattern=parse_sparsity(0.5), exact=exact)
    stats = solve_group(
        ["a", "b"], modules, H, solver, torch.device("cpu"), prune_shared=sparsegpt_arithmetic(solver).prune_shared
    )
    for name, (error, loss, percdamp, _refit) in zip("ab", stats):
        row = LayerResult(
            block=0, name=name, sparsity=0.5, error=error, loss=loss, percdamp=percdamp, seconds=0.0
        ).as_dict()
        assert {"block", "name", "sparsity", "error", "seconds", "loss"} <= row.keys()
        assert isinstance(row["percdamp"], float) and row["percdamp"] == pytest.approx(0.1)
