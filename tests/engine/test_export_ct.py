"""The compressed-tensors export: the solver's codes and scales on disk, loaded by transformers as they are.

Each tiny model's decoder Linears (and MoE experts, per expert) are solved jointly (50% + the
scheme) on a Hessian of random inputs; the reference is the same model as a dense checkpoint
holding the solver's dequantized weights. The saved checkpoint must unpack to the solver's own
codes and scales, load with no extra arguments, hold those weights bit for bit and give the
reference's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.support.tiny_families import tiny_family_model
from tests.support.tiny_models import make_tiny_model
from worker.engine.architectures import adapter_for, prunable_linears
from worker.engine.contract.patterns import parse_sparsity
from worker.engine.export_ct import save_compressed, save_compressed_from_dense
from worker.engine.quant import Quantization, QuantizedWeight
from worker.engine.sparsegpt import Hessian, sparsegpt_prune

DTYPE = torch.bfloat16


def dense_bf16(tmp: Path, family: str) -> Path:
    """The tiny model saved in bf16 (the dtype its scales are stored in)."""
    if family == "qwen3":
        src = tmp / "src"
        tiny_family_model("qwen3").save_pretrained(src)
    else:
        src = make_tiny_model(tmp / "src", family)
    out = tmp / "dense"
    transformers.AutoModelForCausalLM.from_pretrained(src, dtype=DTYPE).save_pretrained(out)
    return out


def solve(W: torch.Tensor, q: Quantization, seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    h = Hessian(W.shape[1], "cpu")
    h.add_batch(torch.randn(4, 50, W.shape[1], generator=g) * torch.linspace(0.2, 2, W.shape[1]))
    result = sparsegpt_prune(W.float(), h.H, parse_sparsity(0.5), blocksize=32, quantization=q)
    assert torch.equal(result.weight, result.quantized.weight)
    return result.quantized


def quantize_checkpoint(dense: Path, q: Quantization) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(Linears by module name, experts by saved name, the saved state with the solver's weights)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=DTYPE)
    prunable = {id(m) for block in adapter_for(model).blocks for m in prunable_linears(block).values()}
    layers = {name for name, m in model.named_modules() if id(m) in prunable}  # the engine's, routers left out
    state = load_file(dense / "model.safetensors")
    linears, experts = {}, {}
    for i, key in enumerate(sorted(state)):
        name = key.removesuffix(".weight")
        if name in layers:
            linears[name] = solve(state[key], q, i)
        elif ".experts." in key and key.endswith(".weight"):
            experts[name] = solve(state[key], q, i)
        else:
            continue
        state[key] = (linears.get(name) or experts[name]).weight.to(DTYPE)
    assert linears and all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in linears)
    return linears, experts, state


def reference_model(tmp: Path, dense: Path, state: dict[str, torch.Tensor]):
    ref = tmp / "reference"
    ref.mkdir()
    (ref / "config.json").write_text((dense / "config.json").read_text())
    save_file(state, ref / "model.safetensors", metadata={"format": "pt"})
    return transformers.AutoModelForCausalLM.from_pretrained(ref, dtype=DTYPE)


def assert_codes_on_disk(out: Path, quantized: dict[str, QuantizedWeight], q: Quantization):
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for name, r in quantized.items():
            assert f"{name}.weight_zero_point" not in keys  # symmetric
            assert torch.equal(f.get_tensor(f"{name}.weight_scale"), r.scale)
            if q.type == "int":
                assert f"{name}.weight" not in keys
                packed = f.get_tensor(f"{name}.weight_packed")
                assert packed.dtype == torch.int32 and packed.shape[1] == r.codes.shape[1] * q.bits // 32
                assert torch.equal(unpack_from_int32(packed, q.bits, f.get_tensor(f"{name}.weight_shape")), r.codes)
            else:
                stored = f.get_tensor(f"{name}.weight")
                assert stored.dtype == torch.float8_e4m3fn
                assert torch.equal(stored.view(torch.int8), r.codes.view(torch.int8))


@pytest.mark.parametrize(
    "family,scheme,group",
    [
        ("llama", "W4A16", 32),
        ("llama", "W4A16", -1),
        ("llama", "W8A16", 32),
        ("llama", "FP8_DYNAMIC", -1),
        ("qwen3", "W4A16", 64),
        ("qwen3", "W8A16", -1),
        ("qwen3_moe", "W4A16", 32),
        ("qwen2", "W8A16", 32),  # q/k/v with biases: kept dense beside the packed weight
        ("mixtral", "W4A16", -1),
        ("qwen3_moe", "FP8_DYNAMIC", -1),
        ("qwen2_moe", "W8A16", 32),  # experts per expert
    ],
)
def test_checkpoint_holds_the_solvers_codes_and_loads_as_evaluated(family, scheme, group, tmp_path):
    dense = dense_bf16(tmp_path, family)
    q = Quantization(scheme, group, scale_dtype=DTYPE)
    linears, experts, state = quantize_checkpoint(dense, q)
    assert bool(experts) == (family in ("qwen3_moe", "qwen2_moe", "mixtral"))
    out = save_compressed_from_dense(dense, linears, q, tmp_path / "ct", experts=experts)
    assert_codes_on_disk(out, {**linears, **experts}, q)

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    assert config["sparsity_config"] == {} and config["format"] == config["config_groups"]["group_0"]["format"]
    assert config["format"] == ("pack-quantized" if q.type == "int" else "float-quantized")
    assert "lm_head" in config["ignore"] and not any(name in config["ignore"] for name in linears)
    assert (weights["num_bits"], weights["type"], weights["symmetric"]) == (q.bits, q.type, True)
    assert weights["group_size"] == (None if group == -1 else group)
    assert weights["strategy"] == ("channel" if group == -1 else "group")
    assert "actorder" not in weights and "g_idx" not in str(config)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)  # no extra arguments
    reference = reference_model(tmp_path, dense, state)
    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded(ids).logits  # the first forward decompresses
        expected = reference(ids).logits
    ours, theirs = loaded.state_dict(), reference.state_dict()
    assert theirs.keys() <= ours.keys()  # the decompressed modules keep their scales besides
    assert all(k.rsplit(".", 1)[1] in ("weight_scale", "weight_shape") for k in ours.keys() - theirs.keys())
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), f"{key} differs from the solver's weight"
    if q.type == "int":
        assert torch.equal(logits, expected)
    else:  # FP8_DYNAMIC also quantizes activations per token, as the checkpoint says (and vLLM does)
        assert not torch.equal(logits, expected)
        assert (logits - expected).abs().max().item() < 0.5


def test_in_memory_export_runs_as_the_checkpoint_loads(tmp_path):
    """save_compressed on the evaluated model: afterwards it still runs, with the saved model's logits."""
    dense = dense_bf16(tmp_path, "llama")
    q = Quantization("FP8_DYNAMIC", -1, scale_dtype=DTYPE)
    linears, _, state = quantize_checkpoint(dense, q)
    model = reference_model(tmp_path, dense, state)
    save_compressed(model, linears, q, tmp_path / "ct")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_bad_exports_are_refused(tmp_path):
    dense = dense_bf16(tmp_path, "llama")
    q = Quantization("W4A16", 32, scale_dtype=DTYPE)
    linears, _, _ = quantize_checkpoint(dense, q)
    name = next(iter(linears))
    with pytest.raises(ValueError, match="not a Linear"):
        save_compressed_from_dense(dense, {"model.norm": linears[name]}, q, tmp_path / "a")
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    with pytest.raises(ValueError, match="scales were rounded"):
        save_compressed(fp32, linears, q, tmp_path / "b")
    with pytest.raises(ValueError, match="no saved weight"):
        save_compressed_from_dense(
            dense, linears, q, tmp_path / "c", experts={"model.layers.0.mlp.experts.9.w1": linears[name]}
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_values_that_round_to_zero_are_stored_as_the_solvers_codes(dtype, tmp_path):
    """A weight far below its row's amax / 448 / 2^9 rounds to an FP8 zero; a negative one used to keep
    its sign (-0), which compressed-tensors stores as +0: the export refused SmolLM2 at FP8 (fp32)."""
    path = make_tiny_model(tmp_path / "m", "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    q = Quantization("FP8_DYNAMIC", -1, scale_dtype=dtype)
    name, linear = next((n, m) for n, m in model.named_modules() if n.endswith("q_proj"))
    W = linear.weight.detach().float().clone()
    W[0, :4] = torch.tensor([-1e-9, 1e-9, -0.0, 0.0]) * W.abs().max()
    codes = q.codes(W, q.fit(W))
    assert not torch.any(codes.view(torch.int8) == torch.tensor(-128, dtype=torch.int8))  # no -0 code
    scale = q.fit(W)
    quantized = QuantizedWeight.of(codes, scale.unsqueeze(1), q)
    with torch.no_grad():
        linear.weight.copy_(quantized.weight.to(dtype))
    save_compressed(model, {name: quantized}, q, tmp_path / "out")  # refused before the fix
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        stored = f.get_tensor(f"{name}.weight")
    assert torch.equal(stored.view(torch.int8), codes.view(torch.int8))
