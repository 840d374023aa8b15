"""What a saved compressed-tensors checkpoint holds: bytes, and the sparsity that survives in it.

Runs in either environment (the project's .venv: compressed-tensors 0.20; .venv-bench:
llm-compressor 0.14 with compressed-tensors 0.19): it reads the safetensors files directly and
dequantizes each decoder Linear with the library's own unpacking, so both sides' checkpoints are
measured by one procedure.

- ``directory_bytes``: every file of the directory (weights, config, tokenizer, recipe).
- decoder weights: the tensors of the Linears inside the decoder blocks (``model.layers.N.``):
  ``weight_packed`` + ``weight_scale`` + ``weight_shape`` (+ ``weight_zero_point``) for INT,
  ``weight`` + ``weight_scale`` for FP8, ``weight`` for a dense one; their fp16 size is the
  weights' element count times 2 bytes. Biases and norms are not Linear weights and are left out.
- surviving sparsity: exact zeros of the dequantized decoder Linear weights over their elements.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # 0.19 and 0.20
from safetensors import safe_open

DECODER = re.compile(r"^model\.layers\.\d+\.")
PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


def directory_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _bits(config: dict) -> int | None:
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    bits = {g["weights"]["num_bits"] for g in groups.values() if g.get("weights")}
    if len(bits) > 1:
        raise ValueError(f"mixed weight bit widths {sorted(bits)}: not measured here")
    return bits.pop() if bits else None


def dequantized_linears(tensors: dict[str, torch.Tensor], bits: int | None) -> dict[str, torch.Tensor]:
    """Module name -> its dequantized fp32 weight, for every decoder Linear (quantized or dense)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not DECODER.match(key):
            continue
        if key.endswith(".weight_packed"):
            name = key.removesuffix(".weight_packed")
            if f"{name}.weight_zero_point" in tensors:
                raise ValueError(f"{name}: asymmetric checkpoints are not measured here")
            codes = unpack_from_int32(value, bits, tensors[f"{name}.weight_shape"])
            scale = tensors[f"{name}.weight_scale"].float()
            out[name] = codes.float() * scale.repeat_interleave(codes.shape[1] // scale.shape[1], dim=1)
        elif key.endswith(".weight") and value.dim() == 2:
            name = key.removesuffix(".weight")
            scale = tensors.get(f"{name}.weight_scale")
            out[name] = value.float() * (scale.float() if scale is not None else 1.0)
    return out


def checkpoint_stats(path: str | Path) -> dict:
    """Bytes of the directory and of its decoder weights, their fp16 size, and the surviving sparsity."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    tensors = _tensors(path)
    weights = dequantized_linears(tensors, _bits(config))
    decoder_bytes = 0
    for name in weights:
        parts = [f"{name}.weight"] + [f"{name}.{p}" for p in PARTS]
        decoder_bytes += sum(tensors[k].numel() * tensors[k].element_size() for k in parts if k in tensors)
    elements = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return {
        "directory_bytes": directory_bytes(path),
        "decoder_weight_bytes": decoder_bytes,
        "decoder_weight_bytes_fp16": elements * 2,
        "decoder_linears": len(weights),
        "decoder_weight_elements": elements,
        "surviving_sparsity": zeros / elements if elements else None,
        "quantization_config": config.get("quantization_config"),
    }
