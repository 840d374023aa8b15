"""Is our W4A16 solve llm-compressor's GPTQ? Two checks behind docs/benchmarks.md's W4A16 figures.

    .venv-bench/bin/python benchmarks/gptq_agreement.py layer
    .venv/bin/python benchmarks/gptq_agreement.py checkpoints build/quant-p/ckpt/ours-w4a16-actorder \\
        build/quant-p/ckpt/llmc-w4a16

``layer`` (in .venv-bench, which has llm-compressor 0.14; this repository on sys.path): one synthetic
layer (576 x 576, inputs with correlated, unevenly scaled features), the same W, H and minmax group
scales (group 64) given to our ``sparsegpt_prune`` (sparsity 0, W4A16) and to llm-compressor's
``quantize_weight``, with and without act order; prints each one's loss tr((W - Q) H (W - Q)^T)
and round to nearest's.

``checkpoints A B``: two compressed-tensors W4A16 checkpoints of the same model; per block, the share
of each quantized layer's packed int32 words that are equal, and whether the scales are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def layer(seed: int = 0, d: int = 576, rows: int = 576, n: int = 4096, group: int = 64) -> None:
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    sys.path.insert(0, str(REPO))
    from worker.engine.contract.patterns import SparsityPattern
    from worker.engine.quant import Quantization
    from worker.engine.sparsegpt import sparsegpt_prune

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    A = torch.randn(d, d) / d**0.5
    X = torch.randn(n, d) @ A + 0.3 * torch.randn(n, d) * torch.linspace(0.1, 3, d)
    H = 2 / n * X.T @ X
    W = torch.randn(rows, d) * 0.05

    def loss(Q):
        E = W - Q
        return (E @ H * E).sum().item()

    groups = W.reshape(rows, d // group, group)
    scale = groups.abs().amax(-1) / 7.5  # compressed-tensors' symmetric 4-bit minmax scale
    rtn = (torch.round(torch.clamp(groups / scale[..., None], -8, 7)) * scale[..., None]).reshape(rows, d)
    print(f"round to nearest: {loss(rtn):.4f}")
    for actorder in (False, True):
        ours = sparsegpt_prune(
            W, H, SparsityPattern(0.0), quantization=Quantization("W4A16", group, actorder, torch.float32)
        )
        args = QuantizationArgs(
            num_bits=4,
            type="int",
            symmetric=True,
            strategy="group",
            group_size=group,
            actorder="weight" if actorder else None,
        )
        zero = torch.zeros_like(scale, dtype=torch.int8)
        theirs, _, _ = quantize_weight(W.clone()[None], H.clone()[None], scale[None], zero[None], None, args, 128, 0.01)
        label = "on " if actorder else "off"
        print(f"act order {label}: ours {loss(ours.weight):.4f}, llm-compressor {loss(theirs[0]):.4f}")


def checkpoints(a: Path, b: Path) -> None:
    import torch
    from safetensors import safe_open

    def load(directory: Path) -> dict:
        tensors = {}
        for f in sorted(directory.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                tensors.update({k: st.get_tensor(k) for k in st.keys()})
        return tensors

    ta, tb = load(a), load(b)
    names = sorted(
        {k[: -len(".weight_packed")] for k in ta if k.endswith(".weight_packed")}
        & set(k[: -len(".weight_packed")] for k in tb if k.endswith(".weight_packed")),
        key=lambda n: (int(n.split(".")[2]) if n.split(".")[2].isdigit() else -1, n),
    )
    for name in names:
        same = (ta[f"{name}.weight_packed"] == tb[f"{name}.weight_packed"]).float().mean().item()
        scales = torch.equal(ta[f"{name}.weight_scale"], tb[f"{name}.weight_scale"])
        print(f"{name}: {same:.4f} of packed words equal, scales {'equal' if scales else 'differ'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="our W4A16 solve beside llm-compressor's GPTQ")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("layer", help="one synthetic layer through both solvers (run in .venv-bench)")
    c = sub.add_parser("checkpoints", help="two W4A16 checkpoints' codes, block by block")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    a = p.parse_args(argv)
    if a.command == "layer":
        layer()
    else:
        checkpoints(a.a, a.b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
