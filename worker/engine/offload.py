"""Where a block's weights live while other blocks have the device: memory-mapped files on the host.

transformers loads safetensors memory-mapped (copy-on-write): the weights are file pages the
kernel may drop and read again, not the process's own memory. Two things would turn them into
anonymous memory, a whole model's worth by the end of a run: ``block.to("cpu")`` after a turn on
the GPU (a fresh host copy of every tensor), and pruning in place on the CPU (copy-on-write).
So a block's turn on the device goes through this module:

- ``onload(block, device)``: the block's tensors copied to the device (on the CPU with
  ``writable``: copied, so the mapped file pages are never written); the host tensors are kept.
- ``offload(block)``: an unchanged block gets its host tensors back (nothing copied);
  ``offload(block, written=path)``: a pruned block is re-pointed at the safetensors file its
  weights were just written to (worker.engine.resume writes one per finished block), so the
  pruned model too stays file pages; without a file a pruned block stays where it was made
  (moved to the host memory from a GPU), as before.

Peak host memory is then about one block, the calibration activations and the Hessians, plus
what the kernel chooses to cache of the files.
"""

from __future__ import annotations

import weakref
from bisect import bisect_right
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

_HOME: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # block -> {(module, kind, name): host tensor}


def _tensors(block: nn.Module):
    """(module, kind, name, tensor) of every parameter and buffer of ``block``, each once."""
    for module in block.modules():
        for name, p in module._parameters.items():
            if p is not None:
                yield module, "p", name, p
        for name, b in module._buffers.items():
            if b is not None:
                yield module, "b", name, b


def _set(module: nn.Module, kind: str, name: str, value: torch.Tensor) -> None:
    if kind == "p":
        module._parameters[name].data = value
    else:
        module._buffers[name] = value


def onload(block: nn.Module, device: torch.device, *, writable: bool = False) -> None:
    """The block's tensors to ``device``; its host tensors are remembered for ``offload``."""
    if block in _HOME:  # already on the device
        return
    home = {}
    for module, kind, name, t in _tensors(block):
        home[(module, kind, name)] = t.data if kind == "p" else t
        if t.device != device or writable:
            moved = t.data.to(device, copy=True) if kind == "p" else t.to(device, copy=True)
            _set(module, kind, name, moved)
    _HOME[block] = home


def offload(block: nn.Module, *, changed: bool = False, written: Path | None = None) -> None:
    """Back to the host: the remembered tensors (``changed`` False), the tensors of the file the
    block's state dict was written to (``written``), or host copies of the changed ones."""
    home = _HOME.pop(block, None)
    if home is None:
        return
    if written is not None:
        for (module, kind, name), host in home.items():
            _set(module, kind, name, host)  # the device copies go; the file's tensors take their place
        attach(block, written)
        return
    for (module, kind, name), host in home.items():
        if not changed:
            _set(module, kind, name, host)
        else:
            current = module._parameters[name].data if kind == "p" else module._buffers[name]
            if current.device != host.device:
                _set(module, kind, name, current.to(host.device))


def attach(block: nn.Module, path: Path) -> None:
    """Point every tensor of ``block`` at the same-named tensor of the safetensors file ``path``
    (its state dict), memory-mapped: no copy is made."""
    names = {id(t): n for n, t in block.state_dict(keep_vars=True).items()}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for module, kind, name, t in _tensors(block):
            key = names.get(id(t))
            if key is None or key not in keys:
                continue  # a non-persistent buffer: stays as it is
            mapped = f.get_tensor(key)
            current = t.data if kind == "p" else t
            if mapped.shape != current.shape or mapped.dtype != current.dtype:
                raise RuntimeError(
                    f"{path}: {key} is {tuple(mapped.shape)} {mapped.dtype}, "
                    f"the block's is {tuple(current.shape)} {current.dtype}"
                )
            if current.device.type != "cpu":
                mapped = mapped.to(current.device)
            _set(module, kind, name, mapped)


def file_backed(tensors: Iterable[torch.Tensor]) -> bool | None:
    """Whether every tensor's memory lies in a mapping of a file on disk in this process
    (/proc/self/maps): pages the kernel can drop and read again. None where /proc cannot tell."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    ranges = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and not fields[5].startswith(("/memfd:", "/dev/")):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    ranges.sort()
    starts = [lo for lo, _ in ranges]
    for t in tensors:
        ptr = t.data_ptr()
        i = bisect_right(starts, ptr) - 1
        if i < 0 or ptr >= ranges[i][1]:
            return False
    return True
