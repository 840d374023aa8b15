"""One pass per block (worker.engine.one_pass): the groups the meta run finds, and the quantizing solve
in one pass against the same true-sequential solve computed directly, group after group, each group's
Hessian from a fresh forward through the block as solved so far; a failing solve leaves no paused chunk."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from greenlet import greenlet
from torch import nn

from tests.support.tiny_models import make_tiny_model
from worker.engine.architectures import LayerSelection, adapter_for, prunable_linears
from worker.engine.block_inputs import capture_block_inputs, run_block
from worker.engine.contract.patterns import SparsityPattern, parse_sparsity
from worker.engine.methods.sparsegpt import sparsegpt_arithmetic
from worker.engine.one_pass import OnePassError, find_groups, run_one_pass
from worker.engine.progress import Tracker
from worker.engine.quant import Quantization
from worker.engine.sequential import SolverSettings, prune_sequential, solve_group
from worker.engine.sparsegpt import Hessian

CPU = torch.device("cpu")
LLAMA_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


def load(tmp_path, arch: str, **config):
    path = make_tiny_model(tmp_path / arch, arch, **config)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def calibration(model, n: int = 7, seqlen: int = 24) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "arch, groups",
    [
        ("llama", LLAMA_GROUPS),
        (
            "opt",
            [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
        ),
        # a parallel block: attention and MLP read one normalized input
        (
            "phi",
            [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"], ["self_attn.dense"], ["mlp.fc2"]],
        ),
    ],
)
def test_groups_in_call_order_from_a_meta_run(arch, groups, tmp_path):
    model = load(tmp_path, arch)
    adapter = adapter_for(model)
    inputs = capture_block_inputs(model, adapter, calibration(model), batch_size=3, device=CPU)
    block = adapter.blocks[0]
    before = [p.clone() for p in block.parameters()]
    assert find_groups(block, prunable_linears(block), inputs) == groups
    assert all(torch.equal(a, b) for a, b in zip(before, block.parameters()))  # nothing computed on the real weights
    assert all(not m._forward_pre_hooks for m in block.modules())


def test_a_block_that_cannot_run_on_meta_keeps_two_passes(tmp_path):
    class ValueDependent(nn.Module):  # routes by a value, as fused experts do
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) if x.sum().item() > 0 else self.b(x)

    block = ValueDependent()
    modules = {"a": block.a, "b": block.b}
    from worker.engine.block_inputs import BlockInputs

    inputs = BlockInputs(hidden=[torch.ones(1, 2, 4)], args=[()], kwargs=[{}])
    assert find_groups(block, modules, inputs) is None


def pattern(sparsity: str) -> SparsityPattern:
    return SparsityPattern(0.0) if sparsity == "0" else parse_sparsity(sparsity)  # 0: quantization only


def direct_true_sequential(model, ids, solver: SolverSettings, batch_size: int) -> None:
    """Each block: for each group in order, a fresh forward through the block as solved so far gives the
    group's input, its Hessian, its solve; then a forward makes the next block's inputs."""
    adapter = adapter_for(model)
    inputs = capture_block_inputs(model, adapter, ids, batch_size=batch_size, device=CPU)
    prune_shared = sparsegpt_arithmetic(solver).prune_shared
    for block in adapter.blocks:
        modules = prunable_linears(block)
        for names in LLAMA_GROUPS:
            owner = modules[names[0]]
            H = Hessian(owner.in_features, CPU)
            handle = owner.register_forward_pre_hook(lambda _m, args, H=H: H.add_batch(args[0]))
            try:
                run_block(block, inputs, CPU, keep=False)
            finally:
                handle.remove()
            solve_group(names, modules, H.H, solver, CPU, prune_shared=prune_shared)
        run_block(block, inputs, CPU, keep=True)


@pytest.mark.parametrize(
    "sparsity, scheme, group, actorder",
    [
        ("0", "W4A16", 32, False),
        ("0.5", "W4A16", 16, True),
        ("2:4", "W8A16", 32, False),
        ("0.5", "FP8_DYNAMIC", -1, False),
    ],
)
def test_one_pass_is_the_true_sequential_solve(sparsity, scheme, group, actorder, tmp_path):
    model = load(tmp_path, "llama")
    direct = copy.deepcopy(model)
    ids = calibration(model)
    quantization = Quantization(scheme, group, actorder, scale_dtype=torch.float32, observer="mse")
    solver = SolverSettings("sparsegpt", pattern(sparsity), quantization=quantization, one_pass=True)
    results = prune_sequential(
        model,
        adapter_for(model),
        ids,
        solver=solver,
        selection=LayerSelection(),
        device=CPU,
        batch_size=3,  # chunks of 3, 3 and 1 sequences, paused together at each group
        tracker=Tracker(None, None, ["pruning"]),
        quantized={},
    )
    assert {r.passes for r in results} == {1}
    direct_true_sequential(direct, ids, solver, batch_size=3)
    for (name, ours), theirs in zip(model.named_parameters(), direct.parameters()):
        assert torch.equal(ours, theirs), name
    # the order matters: the dense block's Hessians (two passes) give other weights after the first group
    two = copy.deepcopy(direct)
    two.load_state_dict(load(tmp_path / "again", "llama").state_dict())
    prune_sequential(
        two,
        adapter_for(two),
        ids,
        solver=SolverSettings("sparsegpt", pattern(sparsity), quantization=quantization),
        selection=LayerSelection(),
        device=CPU,
        batch_size=3,
        tracker=Tracker(None, None, ["pruning"]),
        quantized={},
    )
    q = dict(two.named_parameters())
    assert torch.equal(q["model.layers.0.self_attn.q_proj.weight"], model.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(q["model.layers.0.self_attn.o_proj.weight"], model.model.layers[0].self_attn.o_proj.weight)


def test_a_failing_solve_leaves_no_chunk_paused(tmp_path):
    model = load(tmp_path, "llama")
    adapter = adapter_for(model)
    inputs = capture_block_inputs(model, adapter, calibration(model), batch_size=3, device=CPU)
    block = adapter.blocks[0]
    modules = prunable_linears(block)
    solved = []

    def solve(g, names, H):
        solved.append(g)
        if g == 1:
            raise RuntimeError("cancelled")

    chunks = set()  # each chunk's greenlet, seen at o_proj, where they wait when its solve fails
    handle = block.self_attn.o_proj.register_forward_pre_hook(lambda _m, _a: chunks.add(greenlet.getcurrent()))
    before = [h.clone() for h in inputs.hidden]
    with pytest.raises(RuntimeError, match="cancelled"):
        run_one_pass(block, modules, LLAMA_GROUPS, inputs, CPU, Hessian, solve)
    assert solved == [0, 1]
    assert len(chunks) == 3 and all(g.dead for g in chunks)  # every chunk paused at o_proj was unwound
    handle.remove()
    assert all(not m._forward_pre_hooks for m in block.modules())  # the pass's own hooks are gone
    assert all(torch.equal(a, b) for a, b in zip(before, inputs.hidden))  # no chunk finished
    run_block(block, inputs, CPU, keep=True)  # the block runs as usual after


def test_a_chunk_off_the_meta_path_is_an_error(tmp_path):
    model = load(tmp_path, "llama")
    adapter = adapter_for(model)
    inputs = capture_block_inputs(model, adapter, calibration(model), batch_size=3, device=CPU)
    block = adapter.blocks[0]
    wrong = [LLAMA_GROUPS[0], LLAMA_GROUPS[2], LLAMA_GROUPS[1], LLAMA_GROUPS[3]]  # o_proj is called before gate
    with pytest.raises(OnePassError, match="did not reach mlp.gate_proj") as raised:
        run_one_pass(block, prunable_linears(block), wrong, inputs, CPU, Hessian, lambda g, names, H: None)
    assert raised.value.weights_changed  # q/k/v were solved before: the job cannot fall back
    assert all(not m._forward_pre_hooks for m in block.modules())
    first_wrong = [LLAMA_GROUPS[1], LLAMA_GROUPS[0], *LLAMA_GROUPS[2:]]
    with pytest.raises(OnePassError, match="did not reach self_attn.o_proj") as raised:
        run_one_pass(block, prunable_linears(block), first_wrong, inputs, CPU, Hessian, lambda g, names, H: None)
    assert not raised.value.weights_changed  # nothing solved yet: the block can still run twice


def test_a_block_calling_a_linear_twice_runs_twice_and_says_why(tmp_path):
    model = load(tmp_path, "llama")
    mlp = model.model.layers[0].mlp
    plain = mlp.forward

    def twice(x):  # down_proj called a second time (its output unused): two inputs, two Hessians
        mlp.down_proj(torch.zeros_like(mlp.up_proj(x)))
        return plain(x)

    mlp.forward = twice
    quantization = Quantization("W4A16", 32, scale_dtype=torch.float32)
    why: dict[int, str] = {}
    results = prune_sequential(
        model,
        adapter_for(model),
        calibration(model),
        solver=SolverSettings("sparsegpt", pattern("0"), quantization=quantization, one_pass=True),
        selection=LayerSelection(),
        device=CPU,
        batch_size=3,
        tracker=Tracker(None, None, ["pruning"]),
        quantized={},
        two_passes=why,
    )
    assert {r.block: r.passes for r in results} == {0: 2, 1: 1}
    assert why == {0: "it does not run on the meta device with one call per Linear"}
