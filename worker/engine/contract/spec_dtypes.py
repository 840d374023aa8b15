"""The job spec's dtypes: what a checkpoint is stored in and what a job computes and saves in.

Pure Python: importing this module loads no torch (the API and the memory estimate use it).
"""

from __future__ import annotations

from typing import Any

DTYPES = ("auto", "float16", "bfloat16", "float32")


def stored_dtype(config: dict[str, Any]) -> str | None:
    """The dtype a checkpoint's weights are stored in, as its config.json says (``dtype`` in
    transformers 5, ``torch_dtype`` before; a multimodal model's text config as a fallback):
    "float16", "bfloat16" or "float32", else None (not said)."""
    for source in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        for key in ("dtype", "torch_dtype"):
            value = source.get(key)
            if isinstance(value, str) and value.removeprefix("torch.") in ("float16", "bfloat16", "float32"):
                return value.removeprefix("torch.")
    return None


def working_dtype(spec_dtype: str, device_kind: str, stored: str | None) -> str:
    """The dtype a job loads, computes and saves in. ``auto``: on a GPU the checkpoint's own when
    it is float16 or bfloat16 (its weights then stay memory-mapped from the files, and a bf16
    model is not squeezed into fp16's range), else float16 as the reference does; on the CPU
    float32."""
    if spec_dtype != "auto":
        return spec_dtype
    if device_kind != "cuda":
        return "float32"
    return stored if stored in ("float16", "bfloat16") else "float16"
