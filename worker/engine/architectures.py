"""Where each decoder-only family keeps its blocks, final norm and head.

The sequential driver is written once; this adapter is the only place that knows a model's
module paths. A block's other inputs (attention mask, position ids, rotary position
embeddings, alibi) are not listed here: they are captured from the model's own call of
block 0, so every family that calls its blocks from a ModuleList works alike.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from worker.engine.attention_kinds import check_kinds
from worker.engine.errors import InvalidJob
from worker.engine.moe import is_router

# Module paths, relative to the *ForCausalLM model, tried in order.
BLOCK_PATHS = (
    "model.layers",  # LLaMA, Mistral, Qwen2, SmolLM, Gemma, Phi-3, Phi
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, BLOOM, Falcon, GPT-J
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.language_model.layers",
)
# What runs between the last block and the head, in order (missing or None ones are skipped).
FINAL_PATHS = (
    ("model.norm",),
    ("model.decoder.final_layer_norm", "model.decoder.project_out"),
    ("transformer.ln_f",),
    ("gpt_neox.final_layer_norm",),
    ("model.final_layernorm",),
    ("model.language_model.norm",),
)


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass
class Adapter:
    blocks: nn.ModuleList
    blocks_path: str  # e.g. "model.layers": module names are f"{blocks_path}.{i}.{name}"
    final: list[nn.Module] = field(default_factory=list)  # norm (and projection) after the last block
    lm_head: nn.Module | None = None
    logit_softcap: float | None = None

    def block_name(self, i: int) -> str:
        return f"{self.blocks_path}.{i}"

    def head_modules(self) -> list[nn.Module]:
        return [*self.final, self.lm_head]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a causal LM, or InvalidJob naming what is unsupported."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise InvalidJob("encoder-decoder models are not supported: SparseGPT here prunes decoder-only causal LMs")
    check_kinds(model)  # full and sliding attention mixed: each block replayed with its kind's inputs
    for path in BLOCK_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            break
    else:
        raise InvalidJob(f"{type(model).__name__}: no decoder blocks found at any of {', '.join(BLOCK_PATHS)}")
    final: list[nn.Module] = []
    for paths in FINAL_PATHS:
        found = [_get(model, p) for p in paths]
        if any(isinstance(m, nn.Module) for m in found):
            final = [m for m in found if isinstance(m, nn.Module)]
            break
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise InvalidJob(f"{type(model).__name__} has no output embeddings (lm_head)")
    softcap = getattr(config, "final_logit_softcapping", None)
    return Adapter(blocks=blocks, blocks_path=path, final=final, lm_head=lm_head, logit_softcap=softcap)


def prunable_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The Linear (and GPT-2 Conv1D) layers of one block, by their name inside it, in call order;
    never a mixture-of-experts router (worker.engine.moe.is_router)."""
    return {
        name: m for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and not is_router(name, m)
    }


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features): Conv1D stores it transposed."""
    return module.weight.data.t() if isinstance(module, Conv1D) else module.weight.data


def set_weight_matrix(module: nn.Module, W: torch.Tensor) -> None:
    W = W.t() if isinstance(module, Conv1D) else W
    module.weight.data.copy_(W.to(module.weight.dtype))


@dataclass
class LayerSelection:
    """Which blocks and modules are pruned: a block range and fnmatch patterns on full names."""

    first_block: int | None = None
    last_block: int | None = None  # inclusive
    include: list[str] = field(default_factory=list)  # e.g. ["*.mlp.*"]; empty: all
    exclude: list[str] = field(default_factory=list)  # e.g. ["*.self_attn.o_proj"]

    def validate(self, nblocks: int) -> None:
        first = 0 if self.first_block is None else self.first_block
        last = nblocks - 1 if self.last_block is None else self.last_block
        if not (0 <= first < nblocks) or not (0 <= last < nblocks) or first > last:
            raise InvalidJob(
                f"block range {self.first_block}..{self.last_block} is outside the model's "
                f"{nblocks} blocks (0..{nblocks - 1})"
            )

    def block_selected(self, i: int) -> bool:
        return (self.first_block is None or i >= self.first_block) and (self.last_block is None or i <= self.last_block)

    def module_selected(self, full_name: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(full_name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(full_name, p) for p in self.exclude)
