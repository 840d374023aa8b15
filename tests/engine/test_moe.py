"""Mixture-of-experts: each fused expert pruned with the Hessian of its routed tokens (worker.engine.moe).

Tiny random Mixtral, Qwen3-MoE and Qwen2-MoE (shared expert); the expected weights come from a
direct computation on the dense model: the MoE block's input captured, routed by the model's own
router, each expert's Hessians built from its tokens, the solver applied to its 2-D matrix.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from torch.nn import functional as F
from torch.testing import assert_close

from tests.support.tiny_models import MOE_ARCHS, make_tiny_model, sample_text
from worker.engine.calibration import calibration_windows
from worker.engine.contract.patterns import parse_sparsity
from worker.engine.contract.spec import JobSpec
from worker.engine.moe import ExpertCollector, MoeSettings, expert_matrix, fused_experts
from worker.engine.pipeline import RunOptions, run_job
from worker.engine.sparsegpt import Hessian, sparsegpt_prune_shared

DEVICE = os.environ.get("SPARSEGPT_TEST_DEVICE", "cpu")
NSAMPLES, SEQLEN = 8, 32


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    (d / "cal.txt").write_text(sample_text(), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def models(workdir):
    return {arch: make_tiny_model(workdir / arch, arch) for arch in MOE_ARCHS}


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prune(model_dir, workdir, out, **fields):
    spec = JobSpec.from_flat(
        model=str(model_dir),
        dataset=str(workdir / "cal.txt"),
        nsamples=NSAMPLES,
        seqlen=SEQLEN,
        datasets=[],
        dtype="float32",
        **fields,
    )
    return run_job(spec, RunOptions(device=DEVICE, output=str(out)))


def direct_hessians(model, ids, *, every_token: bool):
    """Block 0's experts: per expert, H of its gate_up input and of its down input, computed plainly."""
    mlp = model.model.layers[0].mlp
    seen = []
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    x = torch.cat(seen)  # (tokens, hidden): what the dense block 0 hands its MoE
    with torch.no_grad():
        _logits, _weights, index = mlp.gate(x)  # the model's own router
    experts = mlp.experts
    H_up, H_down = [], []
    for e in range(experts.num_experts):
        xe = x if every_token else x[(index == e).any(-1)]
        gate, up = F.linear(xe, experts.gate_up_proj[e].detach()).chunk(2, dim=-1)
        act = F.silu(gate) * up
        H_up.append(2 / xe.shape[0] * xe.t().double() @ xe.double())
        H_down.append(2 / act.shape[0] * act.t().double() @ act.double())
    return H_up, H_down, index


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_calibrating_forward_is_the_models_own(arch, models):
    """The instrumented experts forward returns what the experts compute, routed or all-tokens mode."""
    model = load(models[arch])
    block = model.model.layers[0]
    experts = fused_experts(block)
    assert list(experts) == ["mlp.experts"]
    x = torch.randn(1, 24, model.config.hidden_size)
    with torch.no_grad():
        want = block.mlp(x)
    for settings in (MoeSettings(), MoeSettings(all_experts=True)):
        collector = ExpertCollector(experts, torch.device("cpu"), settings, Hessian)
        with torch.no_grad():
            got = block.mlp(x)
        collector.remove()
        assert_close(got, want, rtol=1e-5, atol=1e-6)
        routed = collector.stats["mlp.experts"].tokens
        assert sum(routed) == 24 * model.config.num_experts_per_tok
    assert "forward" not in experts["mlp.experts"].__dict__  # the class's forward is back


def test_gpt_oss_layout_transposed_with_bias():
    """gpt-oss: (E, in, out) matrices, biases, interleaved gate/up and its own clamp: same output,
    and each expert's matrix is seen as a Linear's (out, in)."""
    config = transformers.GptOssConfig(
        hidden_size=32,
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
    )
    torch.manual_seed(0)
    mlp = transformers.models.gpt_oss.modeling_gpt_oss.GptOssMLP(config).eval()
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.2)
    experts = {"experts": mlp.experts}
    assert experts["experts"].is_transposed and experts["experts"].has_bias
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        want = mlp(x)[0] if isinstance(mlp(x), tuple) else mlp(x)
        collector = ExpertCollector(experts, torch.device("cpu"), MoeSettings(), Hessian)
        got = mlp(x)
        got = got[0] if isinstance(got, tuple) else got
    collector.remove()
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert expert_matrix(mlp.experts, "gate_up_proj", 1).shape == (96, 32)  # (2I out, H in)
    assert expert_matrix(mlp.experts, "down_proj", 1).shape == (32, 48)
    assert collector.stats["experts"].up[0].sum.shape == (32, 32)
    assert collector.stats["experts"].down[0].sum.shape == (48, 48)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("mode", ["routed", "fallback", "all_experts"])
def test_experts_pruned_with_their_routed_hessian(arch, mode, models, workdir, tmp_path):
    """Block 0: each expert's weights equal SparseGPT on that expert's 2-D matrix with the Hessian of
    the tokens routed to it (or of every token: the fallback for all experts, or all-experts mode)."""
    fields = {"routed": dict(min_tokens=0), "fallback": dict(min_tokens=10**6), "all_experts": dict(all_experts=True)}[
        mode
    ]
    report = prune(models[arch], workdir, tmp_path / "out", sparsity=0.5, **fields)
    dense, pruned = load(models[arch]), load(tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(models[arch])
    ids = calibration_windows(tokenizer, str(workdir / "cal.txt"), nsamples=NSAMPLES, seqlen=SEQLEN, seed=0)
    H_up, H_down, index = direct_hessians(dense, ids, every_token=mode != "routed")

    record = report["experts"][0]
    assert record["module"] == "model.layers.0.mlp.experts"
    assert record["tokens"] == [int((index == e).any(-1).sum()) for e in range(len(H_up))]
    assert record["hessian"] == [
        {"routed": "routed", "fallback": "all_tokens_fallback", "all_experts": "all_tokens"}[mode]
    ] * len(H_up)
    pattern = parse_sparsity(0.5)
    for pname, hessians in (("gate_up_proj", H_up), ("down_proj", H_down)):
        for e, H in enumerate(hessians):
            W = expert_matrix(dense.model.layers[0].mlp.experts, pname, e).detach()
            want = sparsegpt_prune_shared([W.clone()], H.float(), pattern)[0].weight
            got = expert_matrix(pruned.model.layers[0].mlp.experts, pname, e).detach()
            assert (got == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
            same_mask = ((got == 0) == (want == 0)).float().mean().item()
            assert same_mask > 0.995, (pname, e, same_mask)
            assert_close(got, want, rtol=0, atol=2e-3 * W.abs().max().item())
    # the router is never pruned
    assert torch.equal(dense.model.layers[0].mlp.gate.weight, pruned.model.layers[0].mlp.gate.weight)


@pytest.mark.parametrize("mode", ["routed", "all_experts"])
def test_llama4_experts_pruned_with_the_hessian_of_their_scaled_inputs(mode, workdir, tmp_path):
    """Llama 4's layout: (E, in, out) matrices called on every token's hidden state times the
    router's score for that expert. The calibrating forward is the model's own; each expert's
    weights equal SparseGPT with the Hessian of what its Linear reads: the scaled rows of the
    tokens routed to it (or, all-experts mode, every token unscaled, as its MoE module got it);
    the router and nothing else stays dense."""
    model_dir = make_tiny_model(workdir / "llama4", "llama4_text")
    dense = load(model_dir)
    moe = dense.model.layers[0].feed_forward
    assert list(fused_experts(dense.model.layers[0])) == ["feed_forward.experts"]
    x = torch.randn(1, 24, dense.config.hidden_size)
    with torch.no_grad():
        want = moe(x)[0]
        collector = ExpertCollector(
            {"feed_forward.experts": moe.experts},
            torch.device("cpu"),
            MoeSettings(),
            Hessian,
            block=dense.model.layers[0],
        )
        got = moe(x)[0]
    collector.remove()
    assert torch.equal(got, want) and "forward" not in moe.experts.__dict__
    assert sum(collector.stats["feed_forward.experts"].tokens) == 24  # one expert per token

    fields = dict(min_tokens=0) if mode == "routed" else dict(all_experts=True)
    report = prune(model_dir, workdir, tmp_path / "out", sparsity=0.5, **fields)
    pruned = load(tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = calibration_windows(tokenizer, str(workdir / "cal.txt"), nsamples=NSAMPLES, seqlen=SEQLEN, seed=0)
    seen = []
    handle = moe.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        dense(input_ids=ids, use_cache=False)
        handle.remove()
        hidden = torch.cat(seen)
        scores, _logits = moe.router(hidden)  # (tokens, experts): 0 where not routed
    record = report["experts"][0]
    assert record["module"] == "model.layers.0.feed_forward.experts"
    assert record["tokens"] == [int((scores[:, e] > 0).sum()) for e in range(scores.shape[1])]
    pattern = parse_sparsity(0.5)
    for e in range(scores.shape[1]):
        xe = hidden if mode == "all_experts" else (hidden * scores[:, e : e + 1])[scores[:, e] > 0]
        gate, up = (xe @ moe.experts.gate_up_proj[e].detach()).chunk(2, dim=-1)
        act = up * F.silu(gate)
        for pname, inputs in (("gate_up_proj", xe), ("down_proj", act)):
            H = 2 / inputs.shape[0] * inputs.t().double() @ inputs.double()
            W = expert_matrix(moe.experts, pname, e).detach()
            assert W.shape == (
                (2 * moe.experts.expert_dim, 64) if pname == "gate_up_proj" else (64, moe.experts.expert_dim)
            )
            wanted = sparsegpt_prune_shared([W.clone()], H.float(), pattern)[0].weight
            got = expert_matrix(pruned.model.layers[0].feed_forward.experts, pname, e).detach()
            assert ((got == 0) == (wanted == 0)).float().mean().item() > 0.995, (pname, e)
            assert_close(got, wanted, rtol=0, atol=2e-3 * W.abs().max().item())
    assert torch.equal(moe.router.weight, pruned.model.layers[0].feed_forward.router.weight)
    dense_names = {d["name"] for d in report["coverage"]["dense"]}
    assert dense_names == {f"model.layers.{i}.feed_forward.router.weight" for i in range(2)}, dense_names


def test_fallback_only_for_starved_experts(models, workdir, tmp_path):
    """With a threshold between the experts' counts, exactly the experts below it fall back."""
    probe = prune(models["mixtral"], workdir, tmp_path / "probe", sparsity=0.5, method="wanda", min_tokens=0)
    tokens = probe["experts"][0]["tokens"]
    threshold = sorted(tokens)[len(tokens) // 2]
    report = prune(models["mixtral"], workdir, tmp_path / "out", sparsity=0.5, method="wanda", min_tokens=threshold)
    assert report["experts"][0]["tokens"] == tokens
    assert report["experts"][0]["hessian"] == ["all_tokens_fallback" if t < threshold else "routed" for t in tokens]


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_nm_along_the_input_dimension_and_coverage(arch, method, models, workdir, tmp_path):
    """2:4 in every expert row (groups of 4 inputs), shared experts pruned as MLPs, routers listed dense,
    and the report's sparsity over all block weights beside the pruned modules' 0.5."""
    report = prune(models[arch], workdir, tmp_path / "out", sparsity="2:4", method=method)
    pruned = load(tmp_path / "out")
    for layer in pruned.model.layers:
        experts = layer.mlp.experts
        for pname in ("gate_up_proj", "down_proj"):
            for e in range(experts.num_experts):
                W = expert_matrix(experts, pname, e)
                assert torch.all((W == 0).reshape(W.shape[0], -1, 4).sum(-1) == 2), (pname, e)
        if arch == "qwen2_moe":
            for name in ("gate_proj", "up_proj", "down_proj"):
                W = getattr(layer.mlp.shared_expert, name).weight
                assert torch.all((W == 0).reshape(W.shape[0], -1, 4).sum(-1) == 2)
    dense_names = {d["name"] for d in report["coverage"]["dense"]}
    routers = {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    if arch == "qwen2_moe":
        routers |= {f"model.layers.{i}.mlp.shared_expert_gate.weight" for i in range(2)}
    assert dense_names == routers
    assert all(d["reason"].startswith("router") for d in report["coverage"]["dense"])
    assert report["sparsity_pruned_modules"] == 0.5
    router_weights = sum(p.numel() for n, p in pruned.named_parameters() if f"{n}" in routers)
    block_weights = sum(p.numel() for n, p in pruned.model.layers.named_parameters() if p.dim() >= 2)
    assert report["coverage"]["weights"] == block_weights
    assert report["sparsity"] == pytest.approx(0.5 * (block_weights - router_weights) / block_weights)
    assert report["sparsity"] < 0.5
    # the CLI's summary says both figures and what stayed dense
    from worker.engine.report_text import summary

    text = summary(report)
    assert (
        f"sparsity {report['sparsity']:.4f} over all weights of the pruned blocks (0.5000 over the "
        f"{len(report['layers'])} pruned layers)"
    ) in text
    assert f"left dense in the pruned blocks: {len(routers)} weight tensors" in text and "router" in text
    assert "experts: 8 in 2 modules pruned one by one" in text


@pytest.mark.parametrize(
    "name,router",
    [
        ("mlp.gate", True),
        ("block_sparse_moe.gate", True),
        ("mlp.router", True),
        ("mlp.shared_expert_gate", True),
        ("mlp.router_gate", True),
        ("mlp.gate_proj", False),
        ("mlp.gate_up_proj", False),
        ("per_layer_input_gate", False),
        ("self_attn.output_gate", False),
        ("mlp.shared_expert.gate_proj", False),
    ],
)
def test_routers_by_name(name, router):
    """A Linear called like a router is never pruned; gate projections and other gates are."""
    from worker.engine.moe import is_router

    assert is_router(name, torch.nn.Linear(4, 4)) is router
