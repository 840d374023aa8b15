"""Non-uniform sparsity over the decoder blocks: OWL (Yin et al. 2023, arXiv 2310.05175) and a
profile the user gives, one sparsity per block.

OWL, as the authors' code (and ../shared/ALGORITHM.md) computes it:

1. per block l, the outlier ratio D_l: the share (in %) of the Wanda scores |W_ij| * ||x_j||_2
   of ALL the block's pruned Linears together that are above M times their mean;
2. D min-max normalised to [0, 2 lambda]; density_l = D_l - mean(D) + (1 - S); sparsity_l =
   1 - density_l. More outliers, fewer zeros; the targets span 2 lambda (at most), and their mean
   is S. The mean here is weighted by each block's pruned parameters, so the whole model's
   sparsity is S even when a layer selection makes blocks differ; for blocks of one size (every
   decoder without ``include``/``exclude``) it is the paper's plain mean.

The activation norms come from one extra calibration pass over the DENSE model, block by
block, before any block is pruned (the sequential driver's own pass cannot serve: block l's
inputs there come from the already pruned blocks 0..l-1, and the profile is needed before
block 0). Its cost: one forward of the dense model over the calibration set plus a sum of
squares per Linear input, and the calibration activations held once more while it runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from worker.engine import offload as host
from worker.engine.architectures import Adapter, LayerSelection, prunable_linears, weight_matrix
from worker.engine.block_inputs import capture_block_inputs, release_memory, run_block
from worker.engine.errors import InvalidJob
from worker.engine.progress import Tracker


def selected_modules(adapter: Adapter, selection: LayerSelection, i: int) -> dict[str, nn.Module]:
    """The Linears of block ``i`` that the job prunes (names relative to the block)."""
    if not selection.block_selected(i):
        return {}
    prefix = adapter.block_name(i)
    return {
        name: m
        for name, m in prunable_linears(adapter.blocks[i]).items()
        if selection.module_selected(f"{prefix}.{name}")
    }


def outlier_ratio(weights: Sequence[torch.Tensor], sq_norms: Sequence[torch.Tensor], m: float) -> float:
    """100 x the share of the Wanda scores |W_ij| * ||x_j|| (over all ``weights`` together, each
    (rows, cols) with its inputs' squared norms (cols,)) that are above ``m`` x their mean."""

    def score(W: torch.Tensor, n: torch.Tensor) -> torch.Tensor:  # one layer's at a time: no copy of the block
        return W.float().abs() * n.float().clamp(min=0).sqrt().reshape(1, -1)

    count = sum(W.numel() for W in weights)
    if count == 0:
        return 0.0
    mean = sum(score(W, n).sum(dtype=torch.float64).item() for W, n in zip(weights, sq_norms)) / count
    above = sum((score(W, n) > m * mean).sum().item() for W, n in zip(weights, sq_norms))
    return 100.0 * above / count


def owl_targets(ratios: Sequence[float], sizes: Sequence[int], sparsity: float, lam: float) -> list[float]:
    """Each block's sparsity from its outlier ratio (see the module's docstring): the parameter-
    weighted mean of the result is ``sparsity``; equal ratios (or lambda 0) give ``sparsity``
    everywhere. Targets outside (0, 1) are refused with the numbers."""
    lo, hi = min(ratios), max(ratios)
    if hi <= lo or lam == 0:
        return [float(sparsity)] * len(ratios)
    spread = [(d - lo) / (hi - lo) * 2 * lam for d in ratios]
    mean = sum(d * n for d, n in zip(spread, sizes)) / sum(sizes)
    targets = [1.0 - (d - mean + (1.0 - sparsity)) for d in spread]
    if not all(0.0 < t < 1.0 for t in targets):
        worst = min(range(len(targets)), key=lambda b: min(targets[b], 1 - targets[b]))
        raise InvalidJob(
            f"sparsity_profile owl: at sparsity {sparsity:g} with lambda {lam:g} the blocks' targets span "
            f"{min(targets):.4f}..{max(targets):.4f}, and block {worst}'s {targets[worst]:.4f} is not strictly "
            "between 0 and 1; lower owl.lambda or move the sparsity away from 0 and 1"
        )
    return targets


@torch.no_grad()
def block_outlier_ratios(
    model: nn.Module,
    adapter: Adapter,
    calibration: torch.Tensor,
    *,
    selection: LayerSelection,
    m: float,
    device: torch.device,
    batch_size: int,
    tracker: Tracker,
) -> dict[int, tuple[float, int]]:
    """(outlier ratio, pruned parameters) of every selected block, from one pass of the
    calibration windows (nsamples, seqlen) through the dense model."""
    blocks = [i for i in range(len(adapter.blocks)) if selected_modules(adapter, selection, i)]
    if not blocks:
        return {}
    inputs = capture_block_inputs(model, adapter, calibration, batch_size=batch_size, device=device)
    out: dict[int, tuple[float, int]] = {}
    for i in range(blocks[-1] + 1):
        tracker.emit(
            0.5 + 0.5 * i / (blocks[-1] + 1),
            layer=i,
            layers=len(adapter.blocks),
            message=f"OWL outlier ratios: block {i + 1} of {blocks[-1] + 1}",
        )
        block = adapter.blocks[i]
        host.onload(block, device)
        modules = selected_modules(adapter, selection, i)
        norms: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def accumulate(_module: nn.Module, args: tuple) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                norms[name] = norms.get(name, 0) + (x * x).sum(0)  # noqa: B023 (hooks removed in this iteration)

            return accumulate

        handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in modules.items()]
        try:
            run_block(block, inputs, device, keep=i < blocks[-1])  # the DENSE outputs feed the next block
        finally:
            for h in handles:
                h.remove()
        if modules:
            weights = [weight_matrix(modules[n]) for n in modules]
            sq = [
                norms.get(n, torch.zeros(W.shape[1], device=W.device)) for n, W in zip(modules, weights)
            ]  # not called: 0
            out[i] = (outlier_ratio(weights, sq, m), sum(W.numel() for W in weights))
        host.offload(block)
        release_memory(device)
    del inputs
    release_memory(device)
    return out


def check_profile(spec_profile: str | tuple[float, ...], nblocks: int) -> None:
    """A user's profile has one value per decoder block of the model (checked once it is loaded)."""
    if isinstance(spec_profile, tuple) and len(spec_profile) != nblocks:
        raise InvalidJob(
            f"sparsity_profile has {len(spec_profile)} values but the model has {nblocks} decoder "
            f"blocks: give one sparsity per block (blocks 0..{nblocks - 1})"
        )


def block_targets(
    spec_profile: str | tuple[float, ...],
    *,
    sparsity: float,
    m: float,
    lam: float,
    model: nn.Module,
    adapter: Adapter,
    calibration: torch.Tensor | None,
    selection: LayerSelection,
    device: torch.device,
    batch_size: int,
    tracker: Tracker,
) -> tuple[dict[int, float] | None, dict]:
    """The per-block targets of the job's profile (None: uniform) and what the report says of them."""
    nblocks = len(adapter.blocks)
    check_profile(spec_profile, nblocks)
    if spec_profile == "uniform":
        return None, {"profile": "uniform"}
    if isinstance(spec_profile, tuple):  # the user's own, applied as given
        return dict(enumerate(spec_profile)), {"profile": "list"}
    assert calibration is not None, "OWL needs calibration windows"
    stats = block_outlier_ratios(
        model, adapter, calibration, selection=selection, m=m, device=device, batch_size=batch_size, tracker=tracker
    )
    order = sorted(stats)
    targets = owl_targets([stats[b][0] for b in order], [stats[b][1] for b in order], sparsity, lam)
    return dict(zip(order, targets)), {
        "profile": "owl",
        "m": m,
        "lambda": lam,
        "outlier_ratio": [stats[b][0] if b in stats else None for b in range(nblocks)],
        "mean": "parameter-weighted over the pruned blocks",
    }
