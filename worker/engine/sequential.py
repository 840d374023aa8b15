"""The block-by-block driver: prune (and evaluate) a causal LM one decoder block at a time.

The model stays on the CPU; only the block in flight is moved to the compute device, so a
model larger than the accelerator is pruned with one accelerator. Per block:

1. a calibration pass through the DENSE block, forward pre-hooks accumulating each Linear's
   Hessian (Linears that read the same tensor, q/k/v or gate/up, share one);
2. the Linears are solved (layers sharing a Hessian in one stacked solve) and written back;
3. a second pass through the PRUNED block makes the next block's inputs, in place.

A quantizing SparseGPT solve (``SolverSettings.one_pass``) runs a block once where it can instead,
each group solved as its inputs complete (worker.engine.one_pass); each result says which.
The calibration batch runs through a block in chunks of several sequences, not one at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import nn

from worker.engine import offload as host
from worker.engine.architectures import (
    Adapter,
    LayerSelection,
    prunable_linears,
    set_weight_matrix,
    weight_matrix,
)
from worker.engine.block_inputs import SharedInputs, StopBlockPass, capture_block_inputs, release_memory, run_block
from worker.engine.contract.method_table import method_info
from worker.engine.contract.patterns import SparsityPattern
from worker.engine.methods import prune_layers
from worker.engine.methods.sparsegpt import sparsegpt_arithmetic
from worker.engine.moe import ExpertCollector, MoeSettings, fused_experts, prune_experts
from worker.engine.one_pass import OnePassError, one_pass_order, run_one_pass
from worker.engine.progress import Tracker
from worker.engine.quant import Quantization, QuantizedWeight, restore_quantized, save_quantized
from worker.engine.reference import RunningHessian
from worker.engine.resume import Checkpoints
from worker.engine.sparsegpt import Hessian, PruneResult

log = logging.getLogger(__name__)
LOGIT_TOKENS = 256  # evaluation: (tokens, vocab) fp32 logits are made this many tokens at a time


@dataclass
class LayerResult:
    block: int
    name: str  # full module name, e.g. "model.layers.0.self_attn.q_proj"
    sparsity: float  # zeros / weights after pruning
    error: float | None  # relative reconstruction error on the calibration data
    seconds: float
    loss: float | None = None  # SparseGPT's own objective
    percdamp: float = 0.0  # SparseGPT's dampening as used (above the asked one when H needed more); 0 for the baselines
    target: float | None = None  # the sparsity asked of this layer's block (its profile's value; N:M: N/M)
    refit: dict | None = None  # worker.engine.refit: mode, error_before, swaps, seconds (None: no refit)
    passes: int | None = None  # 1: solved in the block's one pass; 2: from the dense block; None: no data read

    def as_dict(self) -> dict:
        return {
            "block": self.block,
            "name": self.name,
            "sparsity": self.sparsity,
            "target": self.target,
            "error": self.error,
            "seconds": self.seconds,
            "loss": self.loss,
            "percdamp": self.percdamp,
            "refit": self.refit,
            "passes": self.passes,
        }


@dataclass
class SolverSettings:
    method: str  # a name of worker.engine.contract.method_table
    pattern: SparsityPattern
    blocksize: int = 128
    percdamp: float = 0.01
    wbits: int | None = None
    exact: bool = False  # the reference's arithmetic, operation for operation (methods.sparsegpt_arithmetic)
    refit: str = "none"  # after the prune, worker.engine.refit.REFITS
    quantization: Quantization | None = None  # weights on a grid (worker.engine.quant); None: float
    one_pass: bool = False  # a block's groups solved in one pass where it can (worker.engine.one_pass)


class HessianCollector:
    """Forward pre-hooks that accumulate the Hessian of each hooked Linear's input.

    Linears called with the very same input tensor in one forward pass (q/k/v, gate/up)
    share the Hessian of the first of them (``SharedInputs``): ``groups`` maps that owner to all
    its readers. ``hessian(columns, device)`` makes each accumulator.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        device: torch.device,
        *,
        stop_early: bool = True,
        hessian: Callable[[int, torch.device], Hessian | RunningHessian] = Hessian,
    ):
        self.names = set(modules)
        # Once the last Linear has its input, the rest of the dense pass is not needed: its
        # hook stops the pass, provided every other hooked Linear has been called by then.
        self.stop_at = next(reversed(modules), None) if stop_early else None
        self.hessians: dict[str, Hessian | RunningHessian] = {}
        self.shared = SharedInputs()
        self.groups = self.shared.groups
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]
        self.device = device
        self.hessian = hessian

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self.shared.owner(name, x) != name:
                return
            if name not in self.hessians:
                self.hessians[name] = self.hessian(x.shape[-1], self.device)
            self.hessians[name].add_batch(x)
            if name == self.stop_at and self.names <= self.shared.owner_of.keys():
                raise StopBlockPass

        return hook

    def end_pass(self) -> None:
        self.shared.end_pass()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self.shared.end_pass()


def _sparsity(W: torch.Tensor) -> float:
    return (W == 0).sum().item() / W.numel()


def solve_group(
    names: list[str],
    modules: dict[str, nn.Module],
    H: torch.Tensor | None,
    solver: SolverSettings,
    device: torch.device,
    *,
    prune_shared: Callable[..., list[PruneResult]],
    quantized: dict[str, QuantizedWeight] | None = None,
) -> list[tuple[float | None, float | None, float, dict | None]]:
    """Prune the layers of one Hessian group in place with the job's method (worker.engine.methods);
    (error, loss, percdamp, refit) per layer. With quantization each layer's codes and scales go
    into ``quantized`` by its name in ``names`` (the module holds codes x scales).

    ``prune_shared`` is SparseGPT's solve (``sparsegpt_arithmetic(solver).prune_shared``).
    """
    dense = [weight_matrix(modules[n]).to(device) for n in names]
    pruned, stats, grids = prune_layers(dense, H, solver, prune_shared)
    for n, P in zip(names, pruned):
        set_weight_matrix(modules[n], P)
    if grids is not None and quantized is not None:
        quantized.update({n: _to_cpu(q) for n, q in zip(names, grids)})
    return stats


@dataclass
class GroupSolve:
    """Solving one block's Hessian groups, one call each: progress, the solve, one ``LayerResult`` per
    Linear (``results``) and the quantized grids by full module name (``grids``)."""

    block: int
    nblocks: int
    last: int
    prefix: str  # the block's module name
    modules: dict[str, nn.Module]
    solver: SolverSettings
    device: torch.device
    prune_shared: Callable[..., list[PruneResult]]
    tracker: Tracker
    passes: int | None = None  # each result's (LayerResult.passes)
    results: list[LayerResult] = field(default_factory=list)
    grids: dict[str, QuantizedWeight] = field(default_factory=dict)

    def __call__(self, g: int, names: list[str], H: torch.Tensor | None, *, count: int) -> None:
        """Group ``g`` of the block's ``count``: ``names`` (owner first) read the input of Hessian ``H``."""
        i, modules = self.block, self.modules
        self.tracker.emit(
            (i + g / count) / (self.last + 1),
            layer=i,
            layers=self.nblocks,
            module=f"{self.prefix}.{names[0]}",
            message=f"pruning {', '.join(names)}",
        )
        t0 = time.perf_counter()
        grids: dict[str, QuantizedWeight] = {}
        stats = solve_group(
            names, modules, H, self.solver, self.device, prune_shared=self.prune_shared, quantized=grids
        )
        self.grids.update({f"{self.prefix}.{n}": q for n, q in grids.items()})
        seconds = time.perf_counter() - t0
        rows = [weight_matrix(modules[n]).shape[0] for n in names]
        for n, r, (error, loss, percdamp, refit) in zip(names, rows, stats):
            self.results.append(
                LayerResult(
                    block=i,
                    name=f"{self.prefix}.{n}",
                    sparsity=_sparsity(weight_matrix(modules[n])),
                    error=error,
                    loss=loss,
                    percdamp=percdamp,
                    seconds=seconds * r / sum(rows),
                    target=self.solver.pattern.sparsity,
                    refit=refit,
                    passes=self.passes,
                )
            )


def _to_cpu(q: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(codes=q.codes.cpu(), scale=q.scale.cpu(), weight=q.weight.cpu())


@torch.no_grad()
def prune_sequential(
    model: nn.Module,
    adapter: Adapter,
    calibration: torch.Tensor | None,
    *,
    solver: SolverSettings,
    selection: LayerSelection,
    device: torch.device,
    batch_size: int,
    tracker: Tracker,
    targets: dict[int, float] | None = None,
    moe: MoeSettings | None = None,
    expert_records: list[dict] | None = None,
    checkpoints: Checkpoints | None = None,
    quantized: dict[str, QuantizedWeight] | None = None,
    two_passes: dict[int, str] | None = None,
) -> list[LayerResult]:
    """Prune the selected Linears of every selected block; returns one result per Linear.

    ``calibration`` (nsamples, seqlen) token ids; a method that reads no statistics (magnitude) needs
    none. ``targets``: an unstructured sparsity per block (a non-uniform profile, worker.engine.owl)
    instead of the pattern's.
    Fused experts are pruned per expert (worker.engine.moe, ``moe``); their token counts and Hessian
    sources are appended to ``expert_records``. ``checkpoints``: resume and checkpoint (worker.engine.resume).
    ``quantized``: with ``solver.quantization``, each quantized Linear's codes and scales by module name,
    and each expert's by ``expert_key`` (worker.engine.moe); kept with the checkpoints to resume.
    With ``solver.one_pass`` a block runs once where it can (worker.engine.one_pass), else twice (dense,
    then solved), the reason in ``two_passes`` by block. Each result says which (``LayerResult.passes``).
    """
    # Long on purpose: the block loop (inputs in, Hessians, solve, outputs out, checkpoint) is one sequence read in
    # order; split, its per-block state would travel through every piece.
    blocks = adapter.blocks
    nblocks = len(blocks)
    selection.validate(nblocks)
    last = selection.last_block if selection.last_block is not None else nblocks - 1
    needs_data = method_info(solver.method).needs_calibration
    inputs = (
        capture_block_inputs(model, adapter, calibration, batch_size=batch_size, device=device) if needs_data else None
    )
    arithmetic = sparsegpt_arithmetic(solver)
    one_pass = solver.one_pass and needs_data
    results: list[LayerResult] = []
    start = (
        checkpoints.restore(blocks, inputs, results, expert_records, LayerResult, tracker, two_passes)
        if checkpoints
        else 0
    )
    if start and quantized is not None and solver.quantization is not None:
        quantized.update(restore_quantized(checkpoints.dir, start))
    for i in range(start, last + 1):
        block = blocks[i]
        tracker.emit(i / (last + 1), layer=i, layers=nblocks, message=f"block {i + 1} of {nblocks}")
        if not selection.block_selected(i):
            if needs_data:
                host.onload(block, device)
                run_block(block, inputs, device, keep=True)
                host.offload(block)
            continue
        host.onload(block, device, writable=True)  # pruned on a copy: the mapped weights stay untouched
        prefix = adapter.block_name(i)
        modules = {
            name: m for name, m in prunable_linears(block).items() if selection.module_selected(f"{prefix}.{name}")
        }
        experts = {name: m for name, m in fused_experts(block).items() if selection.module_selected(f"{prefix}.{name}")}
        expert_stats = None
        block_solver = solver if targets is None else replace(solver, pattern=SparsityPattern(targets[i]))
        solve = GroupSolve(i, nblocks, last, prefix, modules, block_solver, device, arithmetic.prune_shared, tracker)
        block_grids = solve.grids  # this block's quantized layers, then its experts
        order, why = one_pass_order(block, modules, experts, inputs, device) if one_pass else (None, None)
        solve.passes = (1 if order else 2) if needs_data else None
        if order:  # each group solved as its inputs complete; the next block's inputs made in the same pass
            try:
                run_one_pass(
                    block, modules, order, inputs, device, arithmetic.hessian, partial(solve, count=len(order))
                )
            except OnePassError as e:
                if e.weights_changed:
                    raise
                order, why, solve.passes = None, f"its forward left the path the meta run found ({e})", 2
        if why is not None and two_passes is not None:
            two_passes[i] = why
            log.info("block %d solved in two passes: %s", i, why)
        if not order:
            if needs_data:
                collector = HessianCollector(modules, device, hessian=arithmetic.hessian, stop_early=not experts)
                moe_collector = ExpertCollector(experts, device, moe or MoeSettings(), arithmetic.hessian, block=block)
                try:
                    run_block(block, inputs, device, keep=False, after_chunk=collector.end_pass)
                    collector.remove()
                    moe_collector.fallback(lambda: run_block(block, inputs, device, keep=False))  # noqa: B023 (called here)
                finally:
                    collector.remove()
                    moe_collector.remove()
                expert_stats = moe_collector.stats
                groups = [(names, collector.hessians[owner].H) for owner, names in collector.groups.items()]
                del collector
            else:
                groups = [([name], None) for name in modules]
            for g, (names, H) in enumerate(groups):
                solve(g, names, H, count=len(groups))
            del groups
        results += solve.results
        if experts:
            fields, records = prune_experts(
                experts,
                expert_stats,
                block_solver,
                prefix=prefix,
                block=i,
                device=device,
                prune_shared=arithmetic.prune_shared,
                quantized=block_grids,
            )
            results += [LayerResult(**f, passes=solve.passes) for f in fields]
            if expert_records is not None:
                expert_records += records
        if needs_data and i < last and not order:
            run_block(block, inputs, device, keep=True)  # the pruned block feeds the next one
        if quantized is not None:
            quantized.update(block_grids)
        if checkpoints is not None:
            if block_grids:  # before the block is marked done: a kill in between redoes the block
                save_quantized(checkpoints.dir, i, block_grids)
            checkpoints.block_done(i, block, inputs, results, expert_records, last=last, two_passes=two_passes)
        host.offload(block, changed=True, written=checkpoints.block_file(i) if checkpoints else None)
        release_memory(device)
    tracker.emit(1.0, layer=nblocks - 1, layers=nblocks, message="pruned")
    return results


@torch.no_grad()
def perplexity(
    model: nn.Module,
    adapter: Adapter,
    windows: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int,
    tracker: Tracker,
    label: str = "",
) -> float:
    """exp(mean over windows of the mean next-token cross-entropy), computed block by block."""
    nblocks = len(adapter.blocks)
    inputs = capture_block_inputs(model, adapter, windows, batch_size=batch_size, device=device)
    for i, block in enumerate(adapter.blocks):
        tracker.emit(i / (nblocks + 1), layer=i, layers=nblocks, message=f"{label} block {i + 1} of {nblocks}")
        host.onload(block, device)
        run_block(block, inputs, device, keep=True)
        host.offload(block)
        release_memory(device)
    tracker.emit(nblocks / (nblocks + 1), layer=nblocks - 1, layers=nblocks, message=f"{label} head")
    head = adapter.head_modules()
    for m in head:
        host.onload(m, device)
    nlls = []
    try:
        targets = windows.split(batch_size)
        for c, hidden in enumerate(inputs.hidden):
            for w in range(hidden.shape[0]):  # one window at a time
                h = hidden[w : w + 1].to(device)
                for m in adapter.final:
                    h = m(h)
                h, labels = h[0, :-1], targets[c][w, 1:].to(device)
                total = 0.0
                for t in range(0, labels.numel(), LOGIT_TOKENS):  # fp32 logits of a few tokens at a time
                    logits = adapter.lm_head(h[t : t + LOGIT_TOKENS]).float()
                    if adapter.logit_softcap:
                        logits = torch.tanh(logits / adapter.logit_softcap) * adapter.logit_softcap
                    total += nn.functional.cross_entropy(logits, labels[t : t + LOGIT_TOKENS], reduction="sum").item()
                nlls.append(total / labels.numel())
    finally:
        for m in head:
            host.offload(m)
    return float(torch.exp(torch.tensor(nlls, dtype=torch.float64).mean()).item())
