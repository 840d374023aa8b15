"""Models mixing full and sliding attention (config.layer_types): every block replayed with the
attention inputs of its own kind, bit for bit as the model's own forward, on sequences longer
than the sliding window."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.engine.test_driver import direct_perplexity, job_for, load
from tests.support.tiny_models import make_tokenizer, sample_text
from worker.engine.architectures import adapter_for, prunable_linears, weight_matrix
from worker.engine.block_inputs import capture_block_inputs
from worker.engine.calibration import evaluation_windows
from worker.engine.errors import InvalidJob
from worker.engine.pipeline import run_job

WINDOW = 8  # the sliding window; every sequence here is longer
ALTERNATING = ["sliding_attention", "full_attention"] * 2
COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
# The families of the installed transformers whose layer_types mix full and sliding attention.
FAMILIES = {
    "gemma2": dict(head_dim=16, sliding_window=WINDOW),  # eager attention, soft-capped
    "gemma3_text": dict(head_dim=16, sliding_window=WINDOW, layer_types=ALTERNATING),  # local and global rotary
    "cohere2": dict(sliding_window=WINDOW, layer_types=ALTERNATING),
    "gpt_oss": dict(head_dim=16, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),  # full, full, sliding, sliding
    "qwen3": dict(head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "olmo3": dict(sliding_window=WINDOW),  # three sliding, then full
    "exaone4": dict(sliding_window=WINDOW, layer_types=ALTERNATING),
}


def tiny(arch: str, vocab_size: int = 128):
    config = transformers.AutoConfig.for_model(arch, vocab_size=vocab_size, **COMMON, **FAMILIES[arch])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_block_gets_the_inputs_of_its_kind(arch):
    model = tiny(arch)
    kinds = model.config.layer_types
    assert len(set(kinds)) == 2, kinds
    adapter = adapter_for(model)  # no longer refused
    ids = torch.randint(1, 128, (3, 4 * WINDOW))
    seen = {}
    hooks = [
        b.register_forward_hook(
            lambda _m, args, kwargs, out, i=i: seen.__setitem__(
                i, (args[0] if args else kwargs["hidden_states"], first(out))
            ),
            with_kwargs=True,
        )
        for i, b in enumerate(adapter.blocks)
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    inputs = capture_block_inputs(model, adapter, ids, batch_size=3, device=torch.device("cpu"))
    assert torch.equal(inputs.hidden[0], seen[0][0])
    assert model.config.layer_types == kinds  # the capture put block 0's kind back
    hidden = inputs.hidden[0]
    with torch.no_grad():
        for i, block in enumerate(adapter.blocks):
            own_in, own_out = seen[i]
            out = first(block(own_in, *inputs.args[0], **inputs.kwargs_for(block, 0)))
            assert torch.equal(out, own_out), (arch, i, kinds[i])
            if kinds[i] != kinds[0]:  # the kind matters: block 0's inputs give another output
                assert not torch.equal(first(block(own_in, *inputs.args[0], **inputs.kwargs[0])), own_out)
            hidden = first(block(hidden, *inputs.args[0], **inputs.kwargs_for(block, 0)))  # the driver's chain
    assert torch.equal(hidden, seen[len(kinds) - 1][1])


def test_other_layer_kinds_are_still_refused():
    model = tiny("gemma2")
    model.config.layer_types[1] = "linear_attention"
    with pytest.raises(InvalidJob, match="linear_attention"):
        adapter_for(model)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixed") / "cal.txt"
    path.write_text(sample_text(), encoding="utf-8")
    return path


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_prune_a_mixed_model(arch, calibration_file, tmp_path):
    """A whole prune: every block's Linears at the target, reported per block, and the block-by-block
    perplexity of the pruned model equal to its whole-model forward's (windows of 64 tokens, window 8)."""
    tokenizer = make_tokenizer()
    model = tiny(arch, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    out = tmp_path / "pruned"
    workdir = calibration_file.parent
    report = run_job(*job_for(tmp_path / "dense", workdir, sparsity="2:4", output=str(out)))
    assert sorted({r["block"] for r in report["layers"]}) == [0, 1, 2, 3]
    pruned = load(out)
    for block in adapter_for(pruned).blocks:
        for name, module in prunable_linears(block).items():
            W = weight_matrix(module)
            assert torch.all((W == 0).reshape(W.shape[0], -1, 4).sum(-1) == 2), name
    windows = evaluation_windows(tokenizer, str(calibration_file), seqlen=64, max_windows=4)
    assert report["perplexity"][str(calibration_file)] == pytest.approx(direct_perplexity(pruned, windows), rel=1e-5)
