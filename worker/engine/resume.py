"""Checkpoints after each finished block, so that a job whose process died resumes where it was.

After block ``i`` is pruned and has made the next block's inputs, three files are written to the
job's checkpoint directory, in this order:

- ``block-<i>.safetensors``: the pruned block's tensors (its state dict, in the working dtype);
- ``hidden-<i+1>.safetensors``: the inputs of block ``i+1`` (hidden states, one tensor per chunk);
- ``state.json``: the commit point: what job this is (a fingerprint of its spec, dtype, device kind,
  batch and calibration tokens), the first block not finished, the per-layer results so far.

A later run with the same directory and the same fingerprint restores the finished blocks' weights,
takes the saved hidden states as its inputs and goes on with the next block; the arithmetic is the
uninterrupted run's, so the weights come out the same (bit for bit on the CPU). A fingerprint that
differs (another spec, another calibration) empties the directory and starts over. The other inputs
of a block (masks, positions) are not saved: the model's own capture makes them again.

Disk: every pruned block's tensors (about the size of the model's decoder blocks in the working
dtype) plus, for a moment, two sets of block inputs (nsamples x seqlen x hidden_size x dtype size each).
The blocks' files are also where the pruned blocks live on the host (memory-mapped, worker.engine.offload).
Every file goes through ``write_checkpoint``, the one place that writes there (a storage layer can
route it elsewhere later). The caller removes the directory when the job ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from worker.engine.offload import attach

log = logging.getLogger(__name__)
STATE = "state.json"
VERSION = 2  # 2: a quantizing solve in one pass per block (results carry ``passes``)


def write_checkpoint(directory: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Write one checkpoint file: ``write(tmp)`` to a temporary name in ``directory``, flushed to
    the disk, then renamed to ``name`` (a reader sees the old file or the whole new one)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    tmp = directory / f".{name}.tmp"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def fingerprint(
    *,
    spec: dict,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int,
    calibration: torch.Tensor | None,
    blocks: int,
) -> dict:
    """What must be the same for a checkpoint to be taken up: a rerun of the very same job."""
    tokens = None
    if calibration is not None:
        tokens = hashlib.sha256(calibration.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {
        "version": VERSION,
        "spec": spec,
        "dtype": str(dtype),
        "device": device.type,
        "batch_size": batch_size,
        "calibration_sha256": tokens,
        "blocks": blocks,
    }


def _tensors(module_or_dict) -> dict[str, torch.Tensor]:
    items = module_or_dict.state_dict().items() if isinstance(module_or_dict, nn.Module) else module_or_dict.items()
    out, storages = {}, set()
    for k, v in items:  # no copy of what already is on the host (a block's worth of memory less)
        t = v.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # safetensors refuses tensors that share storage
        storages.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


HIDDEN = re.compile(r"hidden-[0-9]{5}\.safetensors")


def _well_formed(state) -> bool:
    """A state whose block numbers are block numbers and whose inputs file is one of ours (the
    directory may have come from a shared store: a name like ``/etc/passwd`` is no checkpoint)."""
    if not isinstance(state, dict):
        return False
    blocks, hidden, k = state.get("blocks"), state.get("hidden"), state.get("next_block")
    return (
        isinstance(blocks, list)
        and all(type(i) is int and 0 <= i < 100_000 for i in blocks)
        and (hidden is None or (isinstance(hidden, str) and HIDDEN.fullmatch(hidden) is not None))
        and type(k) is int
        and k >= 0
        and isinstance(state.get("results"), list)
    )


class Checkpoints:
    """One job's checkpoint directory. ``restore`` at the start of the prune, ``block_done`` after
    each finished block."""

    def __init__(self, directory: str | Path, fingerprint: dict):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.state = self._read()

    def _read(self) -> dict | None:
        path = self.dir / STATE
        if not path.exists():
            if self.dir.exists():
                self.clear()  # files of a run killed before its first commit
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("checkpoint %s unreadable (%s): starting over", path, exc)
            self.clear()
            return None
        if not _well_formed(state):  # its names are used as paths: fixed patterns only
            log.warning("checkpoint %s names files outside the checkpoint's patterns: starting over", path)
            self.clear()
            return None
        if state.get("fingerprint") != self.fingerprint:
            log.warning(
                "checkpoint in %s is another job's or another run's (spec, dtype, device, batch or "
                "calibration differ): starting over",
                self.dir,
            )
            self.clear()
            return None
        return state

    def block_file(self, i: int) -> Path:
        return self.dir / f"block-{i:05d}.safetensors"

    @property
    def next_block(self) -> int:
        return self.state["next_block"] if self.state else 0

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.state = None

    def restore(
        self,
        blocks: nn.ModuleList,
        inputs,
        results: list,
        expert_records: list | None,
        result_type: type,
        tracker=None,
        two_passes: dict | None = None,
    ) -> int:
        """Put back what the finished blocks left: their weights into ``blocks``, their results into
        ``results`` (as ``result_type``), the next block's hidden states into ``inputs``, why a block ran
        twice into ``two_passes``. Returns the block to go on with (0: nothing to resume)."""
        if not self.state:
            return 0
        state, k = self.state, self.state["next_block"]
        for i in state["blocks"]:
            attach(blocks[i], self.block_file(i))  # memory-mapped, as the pruned blocks of the first attempt
        if inputs is not None and state.get("hidden"):
            saved = load_file(self.dir / state["hidden"])
            if len(saved) != len(inputs.hidden):
                raise RuntimeError(
                    f"checkpoint {self.dir} holds {len(saved)} chunks of inputs, the run has {len(inputs.hidden)}"
                )
            for c, old in enumerate(inputs.hidden):
                new = saved[f"chunk{c}"]
                if new.shape != old.shape or new.dtype != old.dtype:
                    raise RuntimeError(
                        f"checkpoint {self.dir}: chunk {c} is {tuple(new.shape)} {new.dtype}, "
                        f"the run's is {tuple(old.shape)} {old.dtype}"
                    )
                new = new.to(old.device)
                inputs.hidden[c] = new.pin_memory() if old.is_pinned() else new
        results += [result_type(**r) for r in state["results"]]
        if expert_records is not None:
            expert_records += state.get("experts", [])
        if two_passes is not None:
            two_passes.update({int(b): why for b, why in state.get("two_passes", {}).items()})
        log.warning(
            "resuming at block %d of %d: blocks %s restored from the checkpoint in %s",
            k,
            len(blocks),
            f"0-{k - 1}" if k > 1 else "0",
            self.dir,
        )
        if tracker is not None:
            tracker.emit(
                k / len(blocks),
                layer=min(k, len(blocks) - 1),
                layers=len(blocks),
                message=f"resuming at block {k} of {len(blocks)}",
            )
        return k

    def block_done(
        self,
        i: int,
        block: nn.Module | None,
        inputs,
        results: list,
        expert_records: list | None,
        *,
        last: int,
        two_passes: dict | None = None,
    ) -> None:
        """Block ``i`` is finished (``block``: pruned, None: run unchanged); ``inputs`` are block ``i+1``'s;
        ``two_passes``: why blocks so far ran twice where one pass was asked."""
        state = dict(self.state or {"fingerprint": self.fingerprint, "blocks": []})
        if block is not None:
            tensors = _tensors(block)
            write_checkpoint(self.dir, self.block_file(i).name, lambda p: save_file(tensors, str(p)))
            del tensors
            state["blocks"] = sorted({*state["blocks"], i})
        old_hidden = state.get("hidden")
        state["hidden"] = None
        if inputs is not None and i < last:
            hidden = {f"chunk{c}": h for c, h in enumerate(inputs.hidden)}
            name = state["hidden"] = f"hidden-{i + 1:05d}.safetensors"
            write_checkpoint(self.dir, name, lambda p: save_file(_tensors(hidden), str(p)))
        state.update(next_block=i + 1, results=[r.as_dict() for r in results], experts=list(expert_records or []))
        state["two_passes"] = {str(b): why for b, why in (two_passes or {}).items()}
        text = json.dumps(state)
        write_checkpoint(self.dir, STATE, lambda p: p.write_text(text, encoding="utf-8"))
        self.state = state
        if old_hidden and old_hidden != state["hidden"]:
            (self.dir / old_hidden).unlink(missing_ok=True)
