"""What a job pruned, counted over every weight of the pruned blocks, and what stayed dense and why.

**Weights** here are the parameters with two or more dimensions inside the decoder blocks that
the job prunes (its selected block range): Linear matrices, fused expert tensors, routers,
convolution kernels, per-layer tables. One-dimensional parameters (norm scales, biases,
per-channel scalars) are not counted: no method prunes them and they are a tiny share of a block;
nor are stacked biases (gpt-oss's per-expert biases, a router's score-correction bias).
Embeddings and the head, outside the blocks, are never pruned and not counted.

The report's ``sparsity`` is zeros / weights over all of them; ``sparsity_pruned_modules`` is the
same over the pruned ones only; every counted weight that was not pruned is listed by name with
its reason. ``check_prunable`` refuses, before any work, a model whose blocks hold mostly weights
the engine cannot prune, rather than report a success that left most of the model dense.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from worker.engine.architectures import Adapter, LayerSelection
from worker.engine.errors import InvalidJob
from worker.engine.moe import is_fused_experts, is_router, matrix_names

COUNTED = (
    "parameters with 2 or more dimensions inside the pruned blocks; 1-D parameters (norm scales, biases) "
    "and stacked biases (per-expert biases, router score biases) are not weights here"
)
MIN_PRUNABLE_SHARE = 0.5  # below this share of the blocks' weights in prunable layers, a job is refused


def _owner(block: nn.Module, pname: str) -> tuple[str, nn.Module]:
    module_name = pname.rpartition(".")[0]
    return module_name, block.get_submodule(module_name) if module_name else block


def prunable(block: nn.Module, pname: str) -> bool:
    """Whether the block's parameter ``pname`` is one the engine prunes (a Linear's or fused experts' weight)."""
    module_name, owner = _owner(block, pname)
    leaf = pname.rpartition(".")[2]
    if isinstance(owner, (nn.Linear, Conv1D)):
        return leaf == "weight" and not is_router(module_name, owner)
    return is_fused_experts(owner) and leaf in matrix_names(owner)


def _kind(block: nn.Module, pname: str) -> str:
    """Why a weight is not pruned, by what it is."""
    module_name, owner = _owner(block, pname)
    if is_router(module_name, owner):
        return "router (picks experts; never pruned)"
    if isinstance(owner, nn.Embedding):
        return "embedding table (looked up, not multiplied)"
    if isinstance(owner, nn.modules.conv._ConvNd):
        return "convolution kernel (not a Linear)"
    if getattr(owner, "weight", None) is not None and owner.weight.dim() == 1:
        return f"{type(owner).__name__} parameter (not a Linear weight)"
    return f"{type(owner).__name__}.{pname.rpartition('.')[2]}: not a Linear or known fused-experts weight"


def block_weights(block: nn.Module) -> dict[str, nn.Parameter]:
    """The block's weights (2-D+ parameters) by name inside it."""
    return {n: p for n, p in block.named_parameters() if p.dim() >= 2 and not n.endswith("bias")}


def check_prunable(adapter: Adapter, selection: LayerSelection) -> None:
    """InvalidJob when the selected blocks' prunable layers hold under half of their weights."""
    total = share = 0
    unknown: dict[str, int] = {}
    for i, block in enumerate(adapter.blocks):
        if not selection.block_selected(i):
            continue
        for pname, p in block_weights(block).items():
            total += p.numel()
            if prunable(block, pname):
                share += p.numel()
            elif not is_router(*_owner(block, pname)):
                key = f"{type(_owner(block, pname)[1]).__name__}.{pname.rpartition('.')[2]}"
                unknown[key] = unknown.get(key, 0) + p.numel()
    if total and share / total < MIN_PRUNABLE_SHARE:
        top = ", ".join(k for k, _ in sorted(unknown.items(), key=lambda kv: -kv[1])[:4])
        raise InvalidJob(
            f"only {share / total:.0%} of the decoder blocks' weights are in layers this engine prunes "
            f"(Linear layers, fused experts); the rest ({top}) would stay dense"
        )


def weight_name(layer_name: str, model: nn.Module) -> str:
    """A layer result's weight: ``<module>.weight`` for a Linear, the parameter itself for fused experts."""
    sub = model.get_submodule(layer_name.rpartition(".")[0]) if "." in layer_name else model
    leaf = layer_name.rpartition(".")[2]
    return layer_name if isinstance(getattr(sub, leaf, None), nn.Parameter) else f"{layer_name}.weight"


def coverage(model: nn.Module, adapter: Adapter, selection: LayerSelection, pruned_layers: list[str]) -> dict:
    """``sparsity`` over every weight of the selected blocks, ``sparsity_pruned_modules`` over the
    pruned ones (``pruned_layers``: the layer results' names), and the dense weights with reasons."""
    pruned = {weight_name(n, model) for n in pruned_layers}
    zeros_all = total = zeros_pruned = total_pruned = 0
    dense = []
    for i, block in enumerate(adapter.blocks):
        if not selection.block_selected(i):
            continue
        prefix = adapter.block_name(i)
        for pname, p in block_weights(block).items():
            name = f"{prefix}.{pname}"
            zeros = int((p.data == 0).sum().item())
            zeros_all, total = zeros_all + zeros, total + p.numel()
            if name in pruned:
                zeros_pruned, total_pruned = zeros_pruned + zeros, total_pruned + p.numel()
                continue
            module_name = name.rpartition(".")[0]
            if not prunable(block, pname):
                reason = _kind(block, pname)
            elif not selection.module_selected(module_name):
                reason = "excluded by the layer selection (layers.include / layers.exclude)"
            else:
                reason = "not called by the block's forward on the calibration data"
            dense.append({"name": name, "shape": list(p.shape), "reason": reason})
    return {
        "sparsity": zeros_all / total if total else 0.0,
        "sparsity_pruned_modules": zeros_pruned / total_pruned if total_pruned else 0.0,
        "coverage": {
            "counted": COUNTED,
            "weights": total,
            "weights_pruned": total_pruned,
            "weights_dense": total - total_pruned,
            "dense": dense,
            # every parameter of the model (a tied one once): the whole-model sparsity's denominator
            "model_parameters": sum(p.numel() for p in model.parameters()),
        },
    }
