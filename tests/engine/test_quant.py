"""Quantization: the grids against compressed-tensors' own functions, the joint solve against a
straightforward per-column loop written here (float64, every OBS update applied at once)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize, quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from torch.testing import assert_close

from worker.engine.block_steps import _block_column_loop_quantized, block_column_loop
from worker.engine.contract.patterns import SparsityPattern, parse_sparsity
from worker.engine.quant import Quantization, round_to_nearest
from worker.engine.sparsegpt import (
    Hessian,
    LayerStack,
    inverse_hessian_factor,
    solve,
    sparsegpt_prune,
    sparsegpt_prune_shared,
)

NO_PRUNING = SparsityPattern(sparsity=0.0)


def make_inputs(rows=32, cols=256, tokens=600, seed=0):
    """Weights and correlated inputs whose features have very different scales (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    scales = torch.exp(torch.randn(cols, generator=g))
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5
    X = torch.randn(tokens, cols, generator=g) @ mix
    h = Hessian(cols, "cpu")
    for part in (X * scales).reshape(4, -1, cols):
        h.add_batch(part.unsqueeze(0))
    return W, h.H


def ct_args(q: Quantization) -> QuantizationArgs:  # scale_dtype: rounded and eps as stored
    if q.type == "float":
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel", scale_dtype=q.scale_dtype)
    if q.group_size == -1:
        return QuantizationArgs(
            num_bits=q.bits, type="int", symmetric=True, strategy="channel", scale_dtype=q.scale_dtype
        )
    return QuantizationArgs(
        num_bits=q.bits,
        type="int",
        symmetric=True,
        strategy="group",
        group_size=q.group_size,
        scale_dtype=q.scale_dtype,
    )


def ct_scales(W: torch.Tensor, q: Quantization) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' calculate_qparams on each group's min and max (its observer's min-max)."""
    g = W.shape[1] if q.group_size == -1 else q.group_size
    groups = W.reshape(W.shape[0], -1, g)
    return calculate_qparams(groups.amin(-1), groups.amax(-1), ct_args(q))


@pytest.mark.parametrize(
    "scheme,group", [("W4A16", 64), ("W4A16", -1), ("W8A16", 32), ("W8A16", 128), ("FP8_DYNAMIC", -1)]
)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grids_are_compressed_tensors_grids(scheme, group, scale_dtype):
    W, _ = make_inputs(seed=1)
    W[3, :64] = 0  # an all-zero group (or part of a row)
    W[5] *= 1e-3  # a small row
    q = Quantization(scheme, group, scale_dtype=scale_dtype)
    ours = round_to_nearest(W, q)
    scale, zp = ct_scales(W, q)
    assert torch.all(zp == 0)
    assert ours.scale.dtype == scale_dtype
    assert torch.equal(ours.scale.float(), scale)  # rounded to the saved dtype, a zero scale its eps
    used = ours.scale.float()  # compressed-tensors quantizes with the stored scale as well
    codes = quantize(W, used, zp, ct_args(q), dtype=q.code_dtype)
    assert torch.equal(ours.codes.float(), codes.float())
    assert torch.equal(ours.weight, fake_quantize(W, used, zp, ct_args(q)))
    if q.type == "int":
        assert ours.codes.min() >= -(2 ** (q.bits - 1)) and ours.codes.max() <= 2 ** (q.bits - 1) - 1
    preset = preset_name_to_scheme(scheme, ["Linear"]).weights
    assert (preset.num_bits, preset.type, preset.symmetric) == (q.bits, q.type, True)


@pytest.mark.parametrize("scheme,group", [("W4A16", 64), ("W4A16", -1), ("W8A16", 32)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_searched_scales_are_the_least_error_of_their_candidates(scheme, group, scale_dtype):
    """observer "mse": each group's scale is, of the max |x| shrunk by 0..19% (rounded to the saved
    dtype), the one with the least sum |q(x) - x|^2.4, computed here directly in float64; the codes
    are still what compressed-tensors makes from the stored scale, and zeros stay zero."""
    W, _ = make_inputs(seed=11)
    W[2, :32] = 0
    W[torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.3] = 0
    q = Quantization(scheme, group, scale_dtype=scale_dtype, observer="mse")
    ours = round_to_nearest(W, q)
    g = W.shape[1] if group == -1 else group
    groups = W.double().reshape(W.shape[0], -1, g)
    amax = groups.abs().amax(-1)
    half = (2**q.bits - 1) / 2
    qmin, qmax = -(2 ** (q.bits - 1)), 2 ** (q.bits - 1) - 1

    def error(scale):
        codes = torch.clamp(torch.round(groups / scale.unsqueeze(-1)), qmin, qmax)
        return (codes * scale.unsqueeze(-1) - groups).abs().pow(2.4).sum(-1)

    candidates = []
    for step in range(20):
        s = (amax * (1 - step / 100) / half).to(scale_dtype)
        candidates.append(torch.where(s == 0, torch.finfo(scale_dtype).eps, s).double())
    errors = torch.stack([error(s) for s in candidates])
    chosen = error(ours.scale.double())
    assert torch.all(chosen <= errors.min(0).values * (1 + 1e-3))  # the least (up to float32 near-ties)
    minmax = round_to_nearest(W, Quantization(scheme, group, scale_dtype=scale_dtype))
    assert torch.all(ours.scale.float() <= minmax.scale.float())  # only ever shrunk
    assert torch.any(ours.scale.float() < minmax.scale.float())  # and the search does shrink some
    assert torch.all(chosen <= error(minmax.scale.double()) * (1 + 1e-3))
    used = ours.scale.float()
    zp = torch.zeros_like(used)
    assert torch.equal(ours.codes.float(), quantize(W, used, zp, ct_args(q), dtype=q.code_dtype).float())
    assert torch.all(ours.weight[W == 0] == 0)


def test_jobs_search_the_integer_grids_and_say_so():
    """The engine's jobs use the searched scales for W4A16 / W8A16 (FP8 keeps the preset's min-max),
    and the report's words say which."""
    from worker.engine.contract.report import QuantizationPart
    from worker.engine.quant_text import scheme_text
    from worker.engine.quantized_job import quantization_of

    class Spec:
        def __init__(self, scheme, group):
            self.quantization = type("Q", (), {"scheme": scheme, "group_size": group, "actorder": False})()

    assert quantization_of(Spec("W4A16", 64), torch.float16).observer == "mse"
    assert quantization_of(Spec("W8A16", -1), torch.float16).observer == "mse"
    assert quantization_of(Spec("FP8_DYNAMIC", -1), torch.float16).observer == "minmax"
    text = scheme_text(QuantizationPart(scheme="W4A16", group_size=64, actorder=True, observer="mse"))
    assert text == "W4A16 (group size 64, act order, scales searched for the least rounding error)"
    with pytest.raises(ValueError, match="observer"):
        Quantization("W4A16", 64, observer="percentile")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_all_zero_group_gets_the_dtypes_eps(dtype):
    W = torch.zeros(4, 64, dtype=dtype)
    W[1, 3] = 0.5
    q = Quantization("W4A16", 32, scale_dtype=dtype)
    ours = round_to_nearest(W, q)
    scale, _ = ct_scales(W, q)
    assert torch.equal(ours.scale.float(), scale)
    assert ours.scale[0, 0].item() == torch.finfo(dtype).eps
    assert torch.all(ours.weight[W == 0] == 0)


def test_round_to_nearest_keeps_zeros():
    W, _ = make_inputs(seed=2)
    W[torch.rand(W.shape, generator=torch.Generator().manual_seed(0)) < 0.5] = 0
    for scheme, group in [("W4A16", 64), ("W8A16", -1), ("FP8_DYNAMIC", -1)]:
        r = round_to_nearest(W, Quantization(scheme, group))
        assert torch.all(r.weight[W == 0] == 0) and torch.all(r.codes.float()[W == 0] == 0)
        assert torch.equal(
            r.weight, r.codes.float() * r.scale.float().repeat_interleave(W.shape[1] // r.scale.shape[1], dim=1)
        )


def test_bad_quantizations_are_refused():
    with pytest.raises(ValueError, match="scheme"):
        Quantization("W3A16")
    with pytest.raises(ValueError, match="group_size must be -1"):
        Quantization("FP8_DYNAMIC", 128)
    with pytest.raises(ValueError, match="does not divide"):
        round_to_nearest(torch.randn(4, 96), Quantization("W4A16", 64))
    W, H = make_inputs(cols=128)
    with pytest.raises(ValueError, match="act order"):
        sparsegpt_prune(W, H, parse_sparsity("2:4"), quantization=Quantization("W4A16", 64, actorder=True))


def naive_joint(W, H, pattern: SparsityPattern, q: Quantization, blocksize=128, percdamp=0.01):
    """The joint solve written plainly, float64: per column mask, group grid, error, update of all later
    columns. Returns (weight, codes, scales, mask) in the original column order."""
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    g = cols if q.group_size == -1 else q.group_size
    half = (2**q.bits - 1) / 2 if q.type == "int" else 448.0
    qmin, qmax = (-(2 ** (q.bits - 1)), 2 ** (q.bits - 1) - 1) if q.type == "int" else (-448.0, 448.0)

    def fit(Wg):
        s = (Wg.abs().amax(1) / half).to(q.scale_dtype)
        return torch.where(s == 0, torch.finfo(q.scale_dtype).eps, s).double()

    scales = torch.zeros(rows, cols // g, dtype=torch.float64)
    static = q.actorder or g == cols
    if static:  # before the sweep, original order
        for k in range(cols // g):
            scales[:, k] = fit(W[:, k * g : (k + 1) * g])
    perm = torch.argsort(torch.diag(H), descending=True) if q.actorder else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    codes = torch.zeros_like(W)
    for i in range(cols):
        if not pattern.structured and pattern.sparsity > 0 and i % blocksize == 0:
            j = min(i + blocksize, cols)
            score = W[:, i:j] ** 2 / torch.diag(U)[i:j] ** 2
            mask[:, i:j] = score <= score.flatten().sort().values[int(score.numel() * pattern.sparsity)]
        if pattern.structured and i % pattern.m == 0:
            score = W[:, i : i + pattern.m] ** 2 / torch.diag(U)[i : i + pattern.m] ** 2
            mask[:, i : i + pattern.m].scatter_(1, score.argsort(dim=1)[:, : pattern.n], True)
        if not static and i % g == 0:  # refit from the running weights, without the ones to be pruned:
            ahead = mask[:, i : i + g].clone()  # unstructured: the block's mask, chosen at its start
            if pattern.structured:  # N:M: the same rule a step ahead, on this block's later groups of m
                for k in range(i, min(i + g, (i // blocksize + 1) * blocksize), pattern.m):
                    score = W[:, k : k + pattern.m] ** 2 / torch.diag(U)[k : k + pattern.m] ** 2
                    ahead[:, k - i : k - i + pattern.m].scatter_(1, score.argsort(dim=1)[:, : pattern.n], True)
            scales[:, i // g] = fit(W[:, i : i + g].masked_fill(ahead, 0))
        s = scales[:, perm[i] // g]
        x = torch.where(mask[:, i], torch.zeros_like(W[:, i]), W[:, i])
        code = torch.clamp(x / s, qmin, qmax)
        code = torch.round(code) if q.type == "int" else code.float().to(torch.float8_e4m3fn).double()
        codes[:, i] = code
        err = (W[:, i] - code * s) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
        W[:, i] = code * s
    inverse = torch.argsort(perm)
    return W[:, inverse], codes[:, inverse], scales, mask[:, inverse]


def assert_matches_naive(result, naive):
    """Row by row: float32 against float64 can round a code on a tie the other way (the group's largest
    weight sits at x/s = -2^(b-1) + 1/2 by construction), and that row differs from there on. Most rows
    must be the direct computation's, codes, scales and weights."""
    weight, codes, scales, mask = naive
    same = (result.quantized.codes.float() == codes.float()).all(1)
    assert same.float().mean().item() >= 0.9, f"only {same.sum().item()} of {len(same)} rows agree"
    assert_close(result.quantized.scale[same].double(), scales[same], rtol=1e-5, atol=0)
    assert_close(result.weight[same].double(), weight[same], rtol=1e-5, atol=1e-6)
    assert torch.equal(result.weight[same] == 0, weight[same] == 0)
    assert torch.all(result.weight[same][mask[same]] == 0), "a pruned weight is not exactly zero"
    assert torch.equal(result.weight, result.quantized.weight), "the weight is not its codes times its scales"


@pytest.mark.parametrize(
    "pattern,scheme,group,blocksize",
    [
        ("0.5", "W4A16", 64, 128),  # groups inside blocks
        ("0.5", "W4A16", 64, 32),  # groups across blocks: refit with the pending in-block updates
        ("2:4", "W4A16", 32, 128),
        ("4:8", "W8A16", -1, 64),  # one grid per row
        ("0.6", "W8A16", 128, 128),
        ("0.5", "FP8_DYNAMIC", -1, 128),
    ],
)
def test_joint_solve_matches_a_direct_computation(pattern, scheme, group, blocksize):
    W, H = make_inputs()
    q = Quantization(scheme, group, scale_dtype=torch.float32)
    p = parse_sparsity(pattern)
    result = sparsegpt_prune(W, H, p, blocksize=blocksize, quantization=q)
    naive = naive_joint(W, H, p, q, blocksize=blocksize)
    assert_matches_naive(result, naive)
    zero = result.weight == 0
    assert torch.equal(zero, result.quantized.codes.float() == 0)  # a zero weight is code 0, and only it
    if p.structured:
        assert torch.all(zero.reshape(W.shape[0], -1, p.m).sum(-1) >= p.n)
    else:
        assert zero.float().mean().item() >= p.sparsity


@pytest.mark.parametrize(
    "pattern,scheme,group,actorder",
    [
        ("0", "W4A16", 32, False),
        ("0.5", "W4A16", 32, False),
        ("0.5", "W4A16", 32, True),
        ("2:4", "W8A16", 32, False),
        ("4:8", "W4A16", 64, False),
        ("0.5", "FP8_DYNAMIC", -1, False),
    ],
)
def test_the_lean_loop_is_the_reference_column_loop(pattern, scheme, group, actorder):
    """Blocks of 40 columns: the lean loop's 16-column steps meet group starts 24, 16 and 8 columns into
    a block, and groups run past a block's end. Against the reference's loop (every column's update
    applied to the whole block at once), float32 both: the same codes and, up to float rounding, the
    same scales and weights; where the two roundings land a value on the other side of a tie (a code,
    a searched scale, an N:M choice), that row differs from there on."""
    W, H = make_inputs()
    q = Quantization(scheme, group, actorder=actorder, scale_dtype=torch.float32, observer="mse")
    p = SparsityPattern(0.0) if pattern == "0" else parse_sparsity(pattern)
    results = {}
    for name, step in (("reference", block_column_loop), ("lean", _block_column_loop_quantized)):
        stack = LayerStack.of([W], H, None, q)
        block_step = partial(step, pattern=p, quantizer=stack.quantizer)
        [results[name]] = solve(
            stack, p, blocksize=40, percdamp=0.01, factorize=inverse_hessian_factor, block_step=block_step
        )
    ref, lean = results["reference"], results["lean"]
    same = (ref.quantized.codes == lean.quantized.codes).all(1)
    assert same.float().mean().item() >= 0.9, f"only {same.sum().item()} of {len(same)} rows agree"
    assert_close(lean.weight[same], ref.weight[same], rtol=1e-5, atol=1e-6)
    assert_close(lean.quantized.scale[same], ref.quantized.scale[same], rtol=1e-5, atol=0)
    assert torch.equal(lean.weight, lean.quantized.weight)
    if p.structured:
        assert torch.all((lean.weight == 0).reshape(W.shape[0], -1, p.m).sum(-1) >= p.n)


@pytest.mark.parametrize("scheme,group", [("W4A16", 64), ("W8A16", -1)])
def test_sparsity_zero_is_gptq_and_prunes_nothing(scheme, group):
    W, H = make_inputs(seed=4)
    q = Quantization(scheme, group, scale_dtype=torch.float32)
    result = sparsegpt_prune(W, H, NO_PRUNING, quantization=q)
    naive = naive_joint(W, H, NO_PRUNING, q)
    assert not naive[3].any()
    assert_matches_naive(result, naive)
    # the only zeros are weights that round to code 0: a few, far from a pruned block's share
    assert (result.weight == 0).float().mean().item() < 0.15
    assert torch.equal(sparsegpt_prune(W, H, NO_PRUNING).weight, W)  # unquantized: nothing changes
    # GPTQ beats rounding to nearest on the calibration data
    rtn = round_to_nearest(W, q).weight
    delta = lambda P: ((W - P) @ H * (W - P)).sum()  # noqa: E731
    assert delta(result.weight) < delta(rtn)


def test_actorder_uses_static_groups_in_the_original_order():
    W, H = make_inputs(seed=6)
    H[7, :] = 0
    H[:, 7] = 0  # a dead input: its column is zeroed before the static fit
    q = Quantization("W4A16", 64, actorder=True, scale_dtype=torch.float32)
    p = parse_sparsity(0.5)
    result = sparsegpt_prune(W, H, p, quantization=q)
    naive = naive_joint(W, H, p, q)
    assert_matches_naive(result, naive)
    W0 = W.clone()
    W0[:, 7] = 0
    assert torch.equal(result.quantized.scale, round_to_nearest(W0, q).scale)  # fitted once, to the dense W
    searched = Quantization("W4A16", 64, actorder=True, scale_dtype=torch.float32, observer="mse")
    result = sparsegpt_prune(W, H, p, quantization=searched)
    assert torch.equal(result.quantized.scale, round_to_nearest(W0, searched).scale)  # the searched ones, once
    assert not torch.equal(result.quantized.scale, round_to_nearest(W0, q).scale)
    assert torch.all(result.weight[:, 7] == 0)


def test_group_grids_are_refitted_from_the_running_weights():
    """Without act order the second and later groups' scales come from the updated weights, not the dense
    W; the weights the solve prunes have no say in any group's grid."""
    W, H = make_inputs(seed=8)
    q = Quantization("W4A16", 64, scale_dtype=torch.float32)
    result = sparsegpt_prune(W, H, parse_sparsity(0.5), quantization=q)
    dense = round_to_nearest(W, q).scale
    # the first group sees the dense W without its pruned weights (this block's mask): never a larger
    # scale, smaller in a row whose largest weight is pruned
    assert torch.all(result.quantized.scale[:, 0] <= dense[:, 0])
    kept = W[:, :64].masked_fill(result.weight[:, :64] == 0, 0)
    assert torch.equal(result.quantized.scale[:, 0], round_to_nearest(kept, q).scale[:, 0])
    assert not torch.equal(result.quantized.scale[:, 1:], dense[:, 1:])


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_scales_in_the_saved_dtype_and_stacked_layers(scale_dtype):
    """Scales rounded to the saved dtype before use; q/k/v-like layers solved together each get their own."""
    W, H = make_inputs(rows=48, seed=9)
    q = Quantization("W8A16", 32, scale_dtype=scale_dtype)
    p = parse_sparsity("2:4")
    together = sparsegpt_prune_shared([W[:32], W[32:]], H, p, quantization=q)
    for part, r in zip([W[:32], W[32:]], together):
        alone = sparsegpt_prune(part, H, p, quantization=q)
        assert torch.equal(r.quantized.codes, alone.quantized.codes)
        assert torch.equal(r.quantized.scale, alone.quantized.scale)
        assert r.quantized.scale.dtype == scale_dtype
        assert torch.equal(r.weight, r.quantized.codes.float() * r.quantized.scale.float().repeat_interleave(32, 1))
        assert torch.all((r.weight == 0).reshape(part.shape[0], -1, 4).sum(-1) >= 2)
