"""One pass through a decoder block: each Hessian group solved as soon as its inputs are complete.

The two-pass driver (worker.engine.sequential) runs a block over the calibration data twice: the
dense block, to collect every Linear's Hessian, then the solved block, to make the next block's
inputs. Here the block runs once. The calibration chunks go through it in turn, each one paused at
the first Linear of every Hessian group (a greenlet per chunk, all in this thread) until every chunk
has added its input to that group's Hessian; the group is solved and written back, and the chunks go
on through the solved weights. So a Linear's Hessian comes from the block's Linears before it as
solved (GPTQ's "true sequential" order), and the next block's inputs come out of the same pass.

The groups and their order are found by running the block on the meta device (shapes only, no
arithmetic): Linears called with one tensor share a Hessian (q/k/v, gate/up, a parallel block's
attention and MLP inputs). ``one_pass_order`` says when a block keeps the two passes instead: fused
experts (they route by value), a block the meta run cannot follow, too little memory for every
chunk's activations at once (``no_room``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from greenlet import greenlet
from torch import nn
from torch.func import functional_call

from worker.engine.architectures import weight_matrix
from worker.engine.block_inputs import BlockInputs, SharedInputs, to_device

META = torch.device("meta")
# All chunks' activations live at once at a pause: allowed this share of the free memory
SHARE = 0.5


class OnePassError(RuntimeError):
    """A chunk did not follow the path the meta run found (it would be solved from wrong inputs).
    ``weights_changed``: whether a group was solved before it (else the block can still run twice)."""

    weights_changed = False


def _hooks(modules: dict[str, nn.Module], hook: Callable[[str], Callable]) -> list:
    return [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]


@torch.no_grad()
def find_groups(block: nn.Module, modules: dict[str, nn.Module], inputs: BlockInputs) -> list[list[str]] | None:
    """The Hessian groups of ``modules`` in the order the block first calls them, each its owner (the first
    caller) then its other readers, from a run on the meta device. None when the block cannot run
    there, or a hooked Linear is not called, or called twice."""
    shared = SharedInputs()
    twice: list[str] = []

    def hook(name: str):
        def record(_module, args):
            if name in shared.owner_of:  # a second call: its inputs would need two Hessians
                twice.append(name)
            else:
                shared.owner(name, args[0])

        return record

    state = {k: torch.empty_like(v, device=META) for k, v in (*block.named_parameters(), *block.named_buffers())}
    handles = _hooks(modules, hook)
    try:
        functional_call(
            block,
            state,
            (inputs.hidden[0].to(META), *to_device(inputs.args[0], META)),
            to_device(inputs.kwargs_for(block, 0), META),
        )
    except Exception:  # noqa: BLE001 (any failure on meta: the block keeps the two passes)
        return None
    finally:
        for h in handles:
            h.remove()
    if set(shared.owner_of) != set(modules) or twice:
        return None
    return list(shared.groups.values())


def _available_bytes(device: torch.device) -> int | None:
    """Free memory where the activations live: the GPU's, or the host's MemAvailable (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def no_room(inputs: BlockInputs, modules: dict[str, nn.Module], device: torch.device) -> str | None:
    """Why every chunk's activations cannot be held at once (they are, at each pause); None when they
    can: on the CPU or a CUDA GPU where the activations are kept, three times the widest layer's
    activations for every token, plus its Hessian twice, take at most ``SHARE`` of the free memory."""
    if device.type not in ("cpu", "cuda"):
        return f"one pass is used on the CPU and CUDA GPUs, not on {device.type}"
    if not inputs.hidden or inputs.hidden[0].device.type != device.type:
        return "the calibration activations are kept on the CPU (too large for the GPU)"
    tokens = sum(h.shape[0] * h.shape[1] for h in inputs.hidden)
    shapes = [weight_matrix(m).shape for m in modules.values()]
    widest, columns = max(max(shape) for shape in shapes), max(shape[1] for shape in shapes)
    need = 3 * tokens * widest * inputs.hidden[0].element_size() + 2 * 4 * columns * columns
    free = _available_bytes(device)
    if free is None or need <= SHARE * free:
        return None
    return f"every chunk's activations at once would take {need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free"


def one_pass_order(
    block: nn.Module, modules: dict[str, nn.Module], experts: dict, inputs: BlockInputs, device: torch.device
) -> tuple[list[list[str]] | None, str | None]:
    """The block's Hessian groups in call order for one pass, or (None, why it runs twice); (None, None)
    when it has no Linear to solve."""
    if not modules:
        return None, None
    if experts:
        return None, "fused experts route tokens by value"
    why = no_room(inputs, modules, device)
    if why is not None:
        return None, why
    order = find_groups(block, modules, inputs)
    return (order, None) if order else (None, "it does not run on the meta device with one call per Linear")


@torch.no_grad()
def run_one_pass(
    block: nn.Module,
    modules: dict[str, nn.Module],
    groups: list[list[str]],
    inputs: BlockInputs,
    device: torch.device,
    hessian: Callable[[int, torch.device], object],
    solve: Callable[[int, list[str], torch.Tensor], None],
) -> None:
    """Run every chunk of ``inputs`` through ``block`` once; ``solve(g, names, H)`` is called when group
    ``g``'s Hessian has every chunk's input, and must write the group's solved weights into its Linears.
    The block's outputs replace ``inputs.hidden`` in place."""
    # Long on purpose: the chunks' scheduler and the hooks they pause in share one small state; apart,
    # that state would travel through every piece.
    station = {names[0]: g for g, names in enumerate(groups)}
    owner_of = {n: names[0] for names in groups for n in names}
    hessians: dict[int, object] = {}  # made as the first chunk reaches the group, dropped once solved
    main = greenlet.getcurrent()
    chunk_of: dict[greenlet, int] = {}
    paused_at: dict[int, int] = {}  # chunk -> the group it waits at
    read: dict[int, dict[str, weakref.ref]] = {}  # chunk -> owner -> the tensor its group read (not kept alive)
    solved = 0

    def hook(name: str):
        def pause(_module, args):
            c = chunk_of.get(greenlet.getcurrent())
            if c is None:
                return
            x, owner = args[0], owner_of[name]
            if name != owner:
                ref = read[c].get(owner)
                if ref is None or ref() is not x:
                    raise OnePassError(f"{name} did not read what {owner} read, as the meta run found")
                return
            if name in read[c]:
                raise OnePassError(f"{name} was called twice in one forward pass")
            read[c][name] = weakref.ref(x)
            g = station[name]
            if g not in hessians:
                hessians[g] = hessian(x.shape[-1], device)
            hessians[g].add_batch(x)
            paused_at[c] = g
            main.switch()  # the other chunks add theirs; the group is solved; then this chunk goes on

        return pause

    def run_chunk(c: int) -> None:
        hidden = inputs.hidden[c]
        out = block(hidden.to(device, non_blocking=True), *inputs.args[c], **inputs.kwargs_for(block, c))
        out = out[0] if isinstance(out, (tuple, list)) else out
        inputs.hidden[c] = out.to(hidden.device, non_blocking=True)
        read.pop(c, None)

    chunks = [greenlet(lambda c=c: run_chunk(c)) for c in range(len(inputs.hidden))]
    chunk_of.update({g: c for c, g in enumerate(chunks)})
    read.update({c: {} for c in range(len(chunks))})
    state = _torch_state(device)
    handles = _hooks(modules, hook)
    try:
        for g in range(len(groups) + 1):  # a stop at each group, then the block's end
            for c, chunk in enumerate(chunks):
                chunk.switch()
                if g < len(groups) and (chunk.dead or paused_at.get(c) != g):
                    raise OnePassError(f"chunk {c} of the calibration data did not reach {groups[g][0]} in turn")
                if g == len(groups) and not chunk.dead:
                    raise OnePassError(f"chunk {c} of the calibration data called a solved group's Linear again")
                if _torch_state(device) != state:  # thread-wide: a chunk paused inside a context would leak it
                    raise OnePassError(
                        f"chunk {c} paused at {groups[min(g, len(groups) - 1)][0]} inside a torch context"
                    )
            if g < len(groups):
                H = hessians.pop(g).H  # the accumulator's memory back before the solve
                solved += 1
                solve(g, groups[g], H)
                del H
    except OnePassError as e:
        e.weights_changed = solved > 0
        raise
    finally:
        for h in handles:
            h.remove()
        for chunk in chunks:
            if not chunk.dead:
                try:
                    chunk.throw()  # unwinds the paused forward (GreenletExit), nothing left suspended
                except Exception:  # noqa: BLE001 (the error being raised is the one to report)
                    pass


def _torch_state(device: torch.device) -> tuple:
    """The thread-wide torch modes a forward may set (all greenlets share them)."""
    try:
        autocast = torch.is_autocast_enabled(device.type)
    except TypeError:  # an older torch: no device argument
        autocast = torch.is_autocast_enabled()
    return torch.is_grad_enabled(), autocast, torch.is_inference_mode_enabled()
