"""The compressed-tensors checkpoint: the solver's codes and scales written through the library.

compressed-tensors (0.20.1) does the layout: each quantized Linear gets its scheme attached
(``initialize_module_for_quantization``), its compressor (``pack-quantized`` for INT,
``float-quantized`` for FP8) turns the module's state into ``weight_packed`` / ``weight_shape`` /
``weight_scale`` (or an FP8 ``weight``), ``ModelCompressor`` rebuilds the ``quantization_config``
(ignore list included) and writes it into config.json as llm-compressor does
(../shared/QUANTIZATION.md 2.5).

The compressor re-quantizes the weight it is given, and a fake-quantized bf16 weight re-rounds some
8-bit codes (QUANTIZATION.md 1.3). So it is given the exact fp32 value codes * scale (exact: a code
of at most 8 significant bits times a scale of at most 11 fits fp32's 24) and the scale as fp32,
which divide back to the very codes; the packed result is unpacked and checked against the solver's
codes before anything is written, and the stored scale is the solver's, in the model's dtype.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, QuantizationStatus
from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization
from compressed_tensors.utils import get_direct_state_dict, replace_direct_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from worker.engine.quant import Quantization, QuantizedWeight

_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json")


def scheme_of(quantization: Quantization) -> QuantizationScheme:
    """The compressed-tensors preset's scheme with the job's group size (W4A16, W8A16, FP8_DYNAMIC)."""
    if quantization.type == "float":  # FP8_DYNAMIC: per-channel weights, dynamic per-token activations
        weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel", dynamic=False)
        inputs = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
        return QuantizationScheme(
            targets=["Linear"], weights=weights, input_activations=inputs, format="float-quantized"
        )
    if quantization.group_size == -1:
        weights = QuantizationArgs(num_bits=quantization.bits, type="int", symmetric=True, strategy="channel")
    else:
        weights = QuantizationArgs(
            num_bits=quantization.bits, type="int", symmetric=True, strategy="group", group_size=quantization.group_size
        )
    return QuantizationScheme(targets=["Linear"], weights=weights, format="pack-quantized")


def _compressed_state(
    quantized: QuantizedWeight,
    scheme: QuantizationScheme,
    name: str,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    state: dict | None = None,
) -> dict[str, torch.Tensor]:
    """One weight's compressed tensors from the library's compressor, holding the solver's own codes;
    ``state``: the module's other tensors (bias, qparams), passed through."""
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    scale = quantized.scale.float().to(device)
    state = {
        **(state or {}),
        "weight": quantized.weight.to(device, torch.float32),
        "weight_scale": scale,
        "weight_zero_point": torch.zeros(scale.shape, dtype=torch.int8, device=scale.device),
    }
    out = dict(compressor.compress(state, scheme))
    codes = quantized.codes.to(scale.device)
    if "weight_packed" in out:
        stored = unpack_from_int32(out["weight_packed"], scheme.weights.num_bits, out["weight_shape"])
    else:
        stored = out["weight"]
    if stored.dtype != codes.dtype or not torch.equal(stored.view(torch.int8), codes.view(torch.int8)):
        raise RuntimeError(f"{name}: the compressor's codes differ from the solver's")
    out["weight_scale"] = quantized.scale.to(device, dtype)
    return out


@torch.no_grad()
def compress_model(model: nn.Module, quantized: dict[str, QuantizedWeight], quantization: Quantization) -> None:
    """Turn ``model``'s quantized Linears into compressed-tensors modules, in place.

    ``quantized`` maps each module name (``model.named_modules()``) to the solver's codes and
    scales; every other Linear (lm_head, a router, a layer left out) stays dense and is listed in
    the config's ``ignore``. The scales must be in the model's dtype (``quantization.scale_dtype``).
    """
    modules = dict(model.named_modules())
    scheme = scheme_of(quantization)
    for name, q in quantized.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name!r} is not a Linear of this model: compressed-tensors packs Linear weights only")
        if tuple(q.codes.shape) != tuple(module.weight.shape):
            raise ValueError(f"{name}: codes {tuple(q.codes.shape)} for a weight {tuple(module.weight.shape)}")
        if module.weight.dtype != quantization.scale_dtype:
            raise ValueError(
                f"{name}: the model holds {module.weight.dtype} but the scales were rounded to "
                f"{quantization.scale_dtype}: quantize with the saved dtype"
            )
        initialize_module_for_quantization(module, scheme)
        state = _compressed_state(
            q, scheme, name, module.weight.dtype, module.weight.device, get_direct_state_dict(module)
        )
        replace_direct_state_dict(module, state)
        module.quantization_status = QuantizationStatus.COMPRESSED


def save_compressed(
    model: nn.Module,
    quantized: dict[str, QuantizedWeight],
    quantization: Quantization,
    output: str | Path,
    experts: dict[str, QuantizedWeight] | None = None,
) -> Path:
    """Write ``model`` as a compressed-tensors checkpoint in ``output`` (config, safetensors).

    The model is compressed in place (``compress_model``); a forward afterwards decompresses it
    (compressed-tensors' hook), so it still runs, as the checkpoint loads: for FP8_DYNAMIC with its
    per-token activation quantization. Tokenizer and other files are the caller's.

    ``experts``: fused MoE experts (3-D parameters, which compressed-tensors does not compress),
    by the per-expert names transformers saves them under (``...mlp.experts.3.gate_proj``): each
    saved ``<name>.weight`` is replaced by that expert's compressed tensors (QUANTIZATION.md 5;
    transformers 5.25 merges them back into the fused parameter, dequantized, when it loads).
    """
    output = Path(output)
    compress_model(model, quantized, quantization)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    model.save_pretrained(output)
    if experts:
        _compress_saved(output, experts, quantization)
    compressor.update_config(str(output))
    compressor.add_decompress_hook(model)
    return output


def _compress_saved(output: Path, experts: dict[str, QuantizedWeight], quantization: Quantization) -> None:
    """Replace the saved per-expert ``<name>.weight`` tensors by their compressed tensors, file by file."""
    scheme, left = scheme_of(quantization), dict(experts)
    index_file = output / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    for path in sorted(output.glob("*.safetensors")):
        tensors = load_file(path)
        names = [n for n in left if f"{n}.weight" in tensors]
        for name in names:
            dense = tensors.pop(f"{name}.weight")
            q = left.pop(name)
            if tuple(dense.shape) != tuple(q.codes.shape):
                raise ValueError(f"{name}: codes {tuple(q.codes.shape)} for a saved weight {tuple(dense.shape)}")
            for key, value in _compressed_state(q, scheme, name, dense.dtype).items():
                if key != "weight_zero_point":  # symmetric: none on disk
                    tensors[f"{name}.{key}"] = value.contiguous()
                    if index is not None:
                        index["weight_map"][f"{name}.{key}"] = path.name
            if index is not None:
                index["weight_map"].pop(f"{name}.weight", None)
        if names:
            save_file(tensors, path, metadata={"format": "pt"})
    if left:
        raise ValueError(f"no saved weight for {', '.join(sorted(left))}: expected per-expert names as saved")
    if index is not None:
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True))


def save_compressed_from_dense(
    dense_dir: str | Path,
    quantized: dict[str, QuantizedWeight],
    quantization: Quantization,
    output: str | Path,
    experts: dict[str, QuantizedWeight] | None = None,
) -> Path:
    """The same from a saved dense HF directory: loaded, compressed, saved; its other files
    (tokenizer, generation config, card, report) copied beside the new weights and config."""
    import transformers

    dense_dir, output = Path(dense_dir), Path(output)
    model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=quantization.scale_dtype)
    save_compressed(model, quantized, quantization, output, experts)
    weights = {p.name for pattern in _WEIGHT_FILES for p in dense_dir.glob(pattern)}
    for path in dense_dir.iterdir():
        if path.is_file() and path.name not in weights and path.name != "config.json":
            shutil.copy2(path, output / path.name)
    return output


def _rows(q: QuantizedWeight, rows: slice) -> QuantizedWeight:
    return QuantizedWeight(codes=q.codes[rows], scale=q.scale[rows], weight=q.weight[rows])


def _digest(t: torch.Tensor) -> tuple:
    t = t.detach().contiguous().cpu()
    return tuple(t.shape), str(t.dtype), hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def saved_expert_names(
    output: Path, experts: dict[str, QuantizedWeight], dtype: torch.dtype
) -> dict[str, QuantizedWeight]:
    """Each expert matrix's name as ``save_pretrained`` wrote it (``...mlp.experts.3.gate_proj``), found
    by its values: the saved per-expert tensor equal to the expert's codes x scales in ``dtype``. A
    fused gate_up_proj's expert is found whole or as its gate rows and up rows (QUANTIZATION.md 5).
    ``experts``: by any key (worker.engine.moe.expert_key). Raises unless every expert is found once."""
    pieces: dict[tuple, QuantizedWeight | None] = {}
    for key, q in experts.items():
        parts = [q]
        if key.split(":")[0].endswith("gate_up_proj"):
            half = q.codes.shape[0] // 2
            parts += [_rows(q, slice(0, half)), _rows(q, slice(half, None))]
        for part in parts:
            digest = _digest(part.weight.to(dtype))
            same = pieces.get(digest, part)
            pieces[digest] = (
                part
                if same is not None and torch.equal(same.codes.view(torch.int8), part.codes.view(torch.int8))
                else None
            )
    named: dict[str, QuantizedWeight] = {}
    for path in sorted(output.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if ".experts." in key and key.endswith(".weight"):
                    digest = _digest(f.get_tensor(key))
                    if digest in pieces:
                        if pieces[digest] is None:
                            raise RuntimeError(f"{key}: two experts hold the same weights with different codes")
                        named[key.removesuffix(".weight")] = pieces[digest]
    found, wanted = sum(q.codes.numel() for q in named.values()), sum(q.codes.numel() for q in experts.values())
    if found != wanted:
        raise RuntimeError(
            f"the saved checkpoint holds {found} of the {wanted} quantized expert weights under "
            "per-expert names: its experts cannot be written quantized"
        )
    return named


def save_quantized_model(
    model: nn.Module,
    quantized: dict[str, QuantizedWeight],
    quantization: Quantization,
    output: str | Path,
    experts: dict[str, QuantizedWeight] | None = None,
) -> Path:
    """``save_compressed`` for the engine: ``experts`` by their in-memory keys (worker.engine.moe.expert_key),
    their saved names found in what ``save_pretrained`` writes (``saved_expert_names``)."""
    output = Path(output)
    compress_model(model, quantized, quantization)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    model.save_pretrained(output)
    if experts:
        _compress_saved(output, saved_expert_names(output, experts, quantization.scale_dtype), quantization)
    compressor.update_config(str(output))
    compressor.add_decompress_hook(model)
    return output


def compress_in_memory(model: nn.Module, quantized: dict[str, QuantizedWeight], quantization: Quantization) -> None:
    """The model as the checkpoint would load, without writing it: compressed in place, decompressed at its
    next forward (for FP8_DYNAMIC with its per-token activation quantization)."""
    compress_model(model, quantized, quantization)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.add_decompress_hook(model)
