"""Blocks of mixed attention kinds: each block replayed with the attention inputs of its own kind.

Models whose ``config.layer_types`` mix full and sliding attention (Gemma 2 and 3, Cohere 2,
gpt-oss, Qwen2/3 with a sliding window, ...) build one mask per kind (and Gemma 3 one rotary
table per kind) and hand each block those of its ``layer_types`` entry. The driver captures the
inputs of block 0 only, so for every other kind the capture is repeated with block 0 taken for a
block of that kind: its ``layer_types`` entry (and its ``attention_type`` where the model reads
that instead) is set to the kind for the capture's forward, which stops at block 0 before it
runs. What the model then passes is exactly what it passes its blocks of that kind; nothing is
rebuilt here, so sliding windows, chunked attention and per-kind rotary tables are the model's own.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from worker.engine.errors import InvalidJob

# The kinds whose blocks differ only in the attention inputs the model hands them.
REPLAYED = ("full_attention", "sliding_attention", "chunked_attention")
_BLOCK_KIND_ATTRS = ("attention_type",)  # read by some models' block loops instead of config.layer_types[i]


def layer_kinds(model: nn.Module) -> list[str] | None:
    """The per-block kinds of a model that mixes them, else None (every block alike)."""
    kinds = getattr(getattr(model, "config", None), "layer_types", None)
    if not kinds or len(set(kinds)) < 2:
        return None
    return list(kinds)


def check_kinds(model: nn.Module) -> None:
    """InvalidJob for a model mixing layer kinds other than the attention kinds replayed here
    (linear attention, state-space layers, ...): their blocks take other inputs."""
    kinds = layer_kinds(model)
    if kinds is None:
        return
    other = sorted(set(kinds) - set(REPLAYED))
    if other:
        raise InvalidJob(
            f"{type(model).__name__} mixes layer kinds ({', '.join(sorted(set(kinds)))}); this engine replays "
            f"blocks of {', '.join(REPLAYED)} but not {', '.join(other)}"
        )


def _layer_type_lists(model: nn.Module) -> list[list]:
    """Every ``layer_types`` list the model's modules read (the top config and nested ones), once each."""
    lists, seen = [], set()
    for module in model.modules():
        config = getattr(module, "config", None)
        for cfg in (config, getattr(config, "text_config", None)):
            lt = getattr(cfg, "layer_types", None)
            if isinstance(lt, list) and id(lt) not in seen:
                seen.add(id(lt))
                lists.append(lt)
    return lists


@contextmanager
def block_zero_as(model: nn.Module, block0: nn.Module, kind: str):
    """For the duration, the model takes its block 0 for a block of ``kind``. The lists are changed
    in place (a config may validate assignments) and always restored."""
    saved_lists = [(lt, lt[0]) for lt in _layer_type_lists(model) if lt]
    saved_attrs = [(a, getattr(block0, a)) for a in _BLOCK_KIND_ATTRS if isinstance(getattr(block0, a, None), str)]
    try:
        for lt, _ in saved_lists:
            lt[0] = kind
        for a, _ in saved_attrs:
            setattr(block0, a, kind)
        yield
    finally:
        for lt, first in saved_lists:
            lt[0] = first
        for a, value in saved_attrs:
            setattr(block0, a, value)


def kinds_of_blocks(model: nn.Module, blocks: nn.ModuleList) -> dict[int, str]:
    """id(block) -> its kind, for a model that mixes kinds (empty otherwise)."""
    kinds = layer_kinds(model)
    if kinds is None:
        return {}
    return {id(b): k for b, k in zip(blocks, kinds)}


class _Reached(Exception):
    def __init__(self, kwargs: dict):
        super().__init__("captured")
        self.kwargs = kwargs


def _same(a, b) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.device == b.device
        and torch.equal(a, b)
    )


def _share(kwargs: dict, previous: dict | None) -> dict:
    """Chunks of one shape get the same masks: keep one copy (a sliding mask is (b, 1, seq, seq))."""
    if previous is None:
        return kwargs
    return {k: previous[k] if k in previous and _same(v, previous[k]) else v for k, v in kwargs.items()}


@torch.no_grad()
def capture_kind_kwargs(
    model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, *, batch_size: int, move
) -> tuple[dict[str, list[dict]], dict[int, str]]:
    """(kind -> the block keyword arguments per chunk of ``ids``, id(block) -> kind) for the kinds
    other than block 0's; ({}, {}) for a model whose blocks are all alike. ``move(obj)`` puts the
    captured arguments where the blocks run."""
    kinds = layer_kinds(model)
    if kinds is None:
        return {}, {}
    check_kinds(model)

    def stop(_module, args, kwargs):
        raise _Reached(dict(kwargs))

    model_device = next(model.parameters()).device
    by_kind: dict[str, list[dict]] = {}
    block0 = blocks[0]
    handle = block0.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for kind in dict.fromkeys(kinds):
            if kind == kinds[0]:
                continue  # block 0's own kind: the driver's capture
            chunks: list[dict] = []
            with block_zero_as(model, block0, kind):
                for chunk in ids.split(batch_size):
                    try:
                        model(input_ids=chunk.to(model_device), use_cache=False)
                    except _Reached as reached:
                        kwargs = reached.kwargs
                    else:
                        raise RuntimeError("the model returned without calling its first decoder block")
                    kwargs.pop("hidden_states", None)
                    chunks.append(_share(move(kwargs), chunks[-1] if chunks else None))
            by_kind[kind] = chunks
    finally:
        handle.remove()
    return by_kind, kinds_of_blocks(model, blocks)
