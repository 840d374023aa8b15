"""Our compressed-tensors checkpoint has llm-compressor 0.14's layout (issue 26, "Same layout").

The fixtures (tests/engine/data/ct_layout_<case>.json) were made by llm-compressor 0.14 itself, in
its own environment, by benchmarks/ct_layout_fixture.py: a tiny random model from a transformers
config, quantized (GPTQModifier W4A16 group 32, or QuantizationModifier FP8_DYNAMIC), saved with
``save_compressed=True``; every tensor's name, shape and dtype and config.json's
``quantization_config`` were kept. vLLM loads llm-compressor's output; holding ours to the same
layout is how we know it loads ours, without a GPU here.

Here the same config is built, quantized with our solver (sparsity 0: GPTQ through the joint
solve) and written by worker/engine/export_ct.py, and the two layouts are compared: the same
tensor names, shapes and dtypes, and the same ``quantization_config`` keys and values, except the
differences listed in ``INTENDED`` (each with its reason and the values allowed on either side).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from worker.engine.architectures import adapter_for, prunable_linears
from worker.engine.contract.patterns import SparsityPattern
from worker.engine.export_ct import save_compressed_from_dense
from worker.engine.quant import Quantization, QuantizedWeight
from worker.engine.sparsegpt import Hessian, sparsegpt_prune

DATA = Path(__file__).parent / "data"
FIXTURES = sorted(DATA.glob("ct_layout_*.json"))
MISSING = object()  # a key absent on one side

# (path in quantization_config, the values allowed in llm-compressor 0.14's, in ours, why they differ).
# A path with "*" matches every config group and each of its argument blocks (weights, input_activations).
INTENDED = [
    (
        ("version",),
        ("0.19.0",),
        (MISSING, "any"),
        "the writer's compressed-tensors version: llm-compressor 0.14 "
        "pins 0.19.0, we write with 0.20; vLLM does not read it (QUANTIZATION.md 3.2)",
    ),
    (
        ("moe_sparsity_config",),
        (MISSING,),
        (None,),
        "a key compressed-tensors 0.20 adds to every config, always "
        "null for us (we never describe sparsity in the config); 0.19 and vLLM's 0.17 ignore unknown top-level keys",
    ),
    *[
        (
            ("config_groups", "*", "*", key),
            (None, MISSING),
            (MISSING,),
            f"compressed-tensors 0.19 serializes a None "
            f"{key}; 0.20 leaves None-valued arguments out (quant_args.py L240-258): the same arguments when read",
        )
        for key in ("actorder", "block_structure", "scale_dtype", "zp_dtype")
    ],
    (
        ("config_groups", "*", "*", "observer"),
        ("memoryless_minmax", None, MISSING),
        (MISSING,),
        "llm-compressor records the observer it calibrated with; a calibration setting, not part of the layout, and "
        "our grids are fitted by the solver (vLLM parses the argument and never uses it)",
    ),
    (
        ("config_groups", "*", "*", "observer_kwargs"),
        ({}, MISSING),
        (MISSING,),
        "the observer's arguments, empty: left out with the observer",
    ),
]


def _allowed(value, allowed: tuple) -> bool:
    return "any" in allowed or any(value is a if a is MISSING else value == a for a in allowed)


def _matches(path: tuple, pattern: tuple) -> bool:
    return len(path) == len(pattern) and all(p == "*" or p == k for k, p in zip(path, pattern))


def compare_configs(theirs, ours, path: tuple = ()) -> list[str]:
    """Every difference between the two quantization_config blocks that INTENDED does not allow."""
    for pattern, allowed_theirs, allowed_ours, _why in INTENDED:
        if _matches(path, pattern):
            ok = _allowed(theirs, allowed_theirs) and _allowed(ours, allowed_ours)
            return [] if ok else [f"{'.'.join(path)}: llm-compressor {theirs!r}, ours {ours!r} (not as INTENDED)"]
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return [
            d
            for key in sorted(theirs.keys() | ours.keys())
            for d in compare_configs(theirs.get(key, MISSING), ours.get(key, MISSING), (*path, key))
        ]
    if path == ("ignore",) and isinstance(theirs, list) and isinstance(ours, list):
        theirs, ours = sorted(theirs), sorted(ours)  # a list of names to skip: its order means nothing
    if theirs is MISSING or ours is MISSING or theirs != ours:
        show = {id(MISSING): "(absent)"}
        return [f"{'.'.join(path)}: llm-compressor {show.get(id(theirs), theirs)!r}, ours {show.get(id(ours), ours)!r}"]
    return []


def solve(W: torch.Tensor, q: Quantization, seed: int) -> QuantizedWeight:
    """Our joint solve at sparsity 0 (GPTQ) on a Hessian of random inputs."""
    g = torch.Generator().manual_seed(seed)
    h = Hessian(W.shape[1], "cpu")
    h.add_batch(torch.randn(4, 32, W.shape[1], generator=g))
    result = sparsegpt_prune(W.float(), h.H, SparsityPattern(0.0), blocksize=32, quantization=q)
    return result.quantized


def our_checkpoint(fixture: dict, tmp: Path) -> Path:
    """The fixture's tiny model, built from its config, quantized by our solver and saved by export_ct."""
    dtype = getattr(torch, fixture["dtype"])
    config = transformers.AutoConfig.for_model(**fixture["config"])
    torch.manual_seed(0)
    dense = tmp / "dense"
    transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(dense)
    model = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=dtype)
    prunable = {id(m) for block in adapter_for(model).blocks for m in prunable_linears(block).values()}
    layers = {name for name, m in model.named_modules() if id(m) in prunable}  # routers left out
    q = Quantization(fixture["scheme"], fixture["group_size"], scale_dtype=dtype)
    linears, experts = {}, {}
    for i, (key, W) in enumerate(sorted(load_file(dense / "model.safetensors").items())):
        name = key.removesuffix(".weight")
        if name in layers:
            linears[name] = solve(W, q, i)
        elif ".experts." in key and key.endswith(".weight"):  # fused experts, saved per expert
            experts[name] = solve(W, q, i)
    return save_compressed_from_dense(dense, linears, q, tmp / "ct", experts=experts)


def layout(path: Path) -> dict[str, dict]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    return out


def test_the_fixtures_cover_both_schemes_on_a_dense_and_an_moe_model():
    cases = {json.loads(p.read_text())["case"] for p in FIXTURES}
    assert {"llama_w4a16_g32", "llama_fp8_dynamic", "qwen3_moe_w4a16_g32", "qwen3_moe_fp8_dynamic"} <= cases
    for p in FIXTURES:
        made_by = json.loads(p.read_text())["made_by"]
        assert made_by["llmcompressor"].startswith("0.14") and made_by["compressed_tensors"] == "0.19.0"


@pytest.mark.parametrize("fixture_path", FIXTURES, ids=[p.stem.removeprefix("ct_layout_") for p in FIXTURES])
def test_our_checkpoint_has_llm_compressors_layout(fixture_path, tmp_path):
    fixture = json.loads(fixture_path.read_text())
    out = our_checkpoint(fixture, tmp_path)

    ours, theirs = layout(out), fixture["tensors"]
    assert sorted(ours.keys() - theirs.keys()) == [] and sorted(theirs.keys() - ours.keys()) == []
    different = {name: (theirs[name], ours[name]) for name in theirs if theirs[name] != ours[name]}
    assert different == {}

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert compare_configs(fixture["quantization_config"], config) == []


def test_the_comparison_catches_a_real_difference():
    """The config comparison is not blind: a changed value, a missing key or an unlisted extra key fails."""
    fixture = json.loads((DATA / "ct_layout_llama_w4a16_g32.json").read_text())["quantization_config"]
    ours = json.loads(json.dumps(fixture))  # as compressed-tensors 0.20 writes the same config
    ours.update(version="0.20.1", moe_sparsity_config=None)
    for key in ("actorder", "block_structure", "scale_dtype", "zp_dtype", "observer", "observer_kwargs"):
        del ours["config_groups"]["group_0"]["weights"][key]
    assert compare_configs(fixture, ours) == []
    changed = json.loads(json.dumps(ours))
    changed["config_groups"]["group_0"]["weights"]["group_size"] = 64
    assert compare_configs(fixture, changed) == ["config_groups.group_0.weights.group_size: llm-compressor 32, ours 64"]
    changed = json.loads(json.dumps(ours))
    changed["config_groups"]["group_0"]["weights"]["zp_dtype"] = "int8"
    assert len(compare_configs(fixture, changed)) == 1
    changed = json.loads(json.dumps(ours))
    del changed["ignore"]
    changed["sparsity_config"] = {"format": "sparse-24-bitmask"}
    assert len(compare_configs(fixture, changed)) == 2
