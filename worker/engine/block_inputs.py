"""What enters a decoder block, and running it: block 0's inputs captured from the model's own
forward, kept per chunk of sequences (on the accelerator when they fit, else on the CPU), run
through a block chunk by chunk; and giving a block's freed memory back. The drivers
(worker.engine.sequential, worker.engine.owl) and the evaluations use them.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from worker.engine.architectures import Adapter
from worker.engine.attention_kinds import capture_kind_kwargs


@dataclass
class BlockInputs:
    """What enters a block, per chunk of sequences: hidden states and the other arguments."""

    hidden: list[torch.Tensor]  # each (b, seq, hidden), on the storage device
    args: list[tuple]  # positional arguments after the hidden states, on the compute device
    kwargs: list[dict]  # attention mask, position ids / embeddings, alibi, ..., on the compute device
    by_kind: dict = field(default_factory=dict)  # mixed attention: other kind -> kwargs per chunk
    kind_of: dict = field(default_factory=dict)  # id(block) -> its kind (worker.engine.attention_kinds)

    def kwargs_for(self, block: nn.Module, c: int) -> dict:
        kind = self.kind_of.get(id(block))
        return self.by_kind[kind][c] if kind in self.by_kind else self.kwargs[c]


class SharedInputs:
    """Which hooked Linears read the very same tensor in one forward pass (q/k/v, gate/up): they share
    the Hessian of the first of them, its owner. ``owner(name, x)`` at each call; ``groups`` maps each
    owner to all its readers, in call order; ``end_pass()`` between forward passes."""

    def __init__(self) -> None:
        self.owner_of: dict[str, str] = {}
        self.groups: dict[str, list[str]] = {}
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input, owner), one pass

    def owner(self, name: str, x: torch.Tensor) -> str:
        if name not in self.owner_of:
            seen = self._seen.get(id(x))
            owner = seen[1] if seen is not None and seen[0] is x else name
            self.owner_of[name] = owner
            self.groups.setdefault(owner, []).append(name)
        owner = self.owner_of[name]
        if owner == name:
            self._seen[id(x)] = (x, name)
        return owner

    def end_pass(self) -> None:
        self._seen.clear()


class StopBlockPass(Exception):
    """Raised by a hook to end a block's forward pass early (its output is not needed)."""


class _BlockZeroReached(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("captured")
        self.args, self.kwargs = args, kwargs


def to_device(obj, device: torch.device, non_blocking: bool = False):
    """Move every tensor inside nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, non_blocking) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, non_blocking) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    return obj


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim() if sys.platform.startswith("linux") else None


def release_memory(device: torch.device) -> None:
    """Give the block's freed temporaries back: CUDA's cache, and glibc's free lists on the CPU
    (without this a process keeps a block's worth of freed pages resident; peak RSS is a target)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def storage_device(device: torch.device, nbytes: int) -> torch.device:
    """Keep activations on the accelerator only when they fit comfortably, else on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        if nbytes <= 0.4 * free:
            return device
    return torch.device("cpu")


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: Adapter, ids: torch.Tensor, *, batch_size: int, device: torch.device
) -> BlockInputs:
    """Run the model's embeddings on ``ids`` (n, seq) and stop at block 0, keeping its inputs.

    The embeddings run where the model lives (the CPU); the block's other arguments are
    whatever the model itself passes (causal mask, position ids, rotary cos/sin, alibi).
    """

    def stop(_module, args, kwargs):
        raise _BlockZeroReached(args, kwargs)

    model_device = next(model.parameters()).device
    itemsize = next(model.parameters()).element_size()
    hidden_size = model.config.hidden_size if hasattr(model.config, "hidden_size") else None
    nbytes = ids.numel() * (hidden_size or 0) * itemsize
    store = storage_device(device, nbytes)
    pin = store.type == "cpu" and device.type == "cuda"
    inputs = BlockInputs(hidden=[], args=[], kwargs=[])
    handle = adapter.blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for chunk in ids.split(batch_size):
            try:
                model(input_ids=chunk.to(model_device), use_cache=False)
            except _BlockZeroReached as captured:
                args, kwargs = captured.args, dict(captured.kwargs)
            else:
                raise RuntimeError("the model returned without calling its first decoder block")
            hidden = args[0] if args else kwargs.pop("hidden_states")
            hidden = hidden.to(store)
            inputs.hidden.append(hidden.pin_memory() if pin else hidden)
            inputs.args.append(to_device(tuple(args[1:]), device))
            inputs.kwargs.append(to_device(kwargs, device))
    finally:
        handle.remove()
    inputs.by_kind, inputs.kind_of = capture_kind_kwargs(
        model, adapter.blocks, ids, batch_size=batch_size, move=lambda kw: to_device(kw, device)
    )
    return inputs


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device, *, keep: bool, after_chunk=None) -> None:
    """Run every chunk through ``block``; with ``keep`` the outputs replace the inputs in place."""
    for c, hidden in enumerate(inputs.hidden):
        try:
            out = block(hidden.to(device, non_blocking=True), *inputs.args[c], **inputs.kwargs_for(block, c))
        except StopBlockPass:
            out = None  # a calibration pass that had all it needed
        out = out[0] if isinstance(out, (tuple, list)) else out
        if keep:
            inputs.hidden[c] = out.to(hidden.device, non_blocking=True)
        if after_chunk is not None:
            after_chunk()
