"""A training-free refit after the prune: lower each layer's reconstruction error
||W X - W' X||^2 = tr((W - W') H (W - W')^T) with the Hessian H = X X^T the solve already has.

SparseGPT fixes its mask column by column and updates only the columns to the right of each
pruned weight, once. Given its mask, the best kept weights solve a masked least-squares problem
per row (the rows are independent: H is shared, the masks differ):

    minimise (w - w') H_d (w - w')^T  over w' with w'_j = 0 on the row's pruned positions,

H_d = H + damp I with SparseGPT's own dampening (``percdamp`` of H's mean diagonal; it keeps the
kept weights near the dense ones where the data says little). Modes (``REFITS``):

``none``              nothing.
``reconstruct``       the kept weights re-solved on the fixed mask: preconditioned conjugate
                      gradients on H_d (diagonal preconditioner), all rows of the layers that read
                      one H at once, warm-started from the pruned weights. The same problem that
                      Boza 2024 (arXiv 2401.02938) solves by ADMM.
``swap+reconstruct``  first mask swaps that lower the same objective (DSnoT arXiv 2310.08915,
                      SparseSwaps arXiv 2512.10922): per row, a kept weight is pruned and a pruned
                      one regrown at its best value (t = (g_j + a H_ij) / H_jj) when the exact
                      change of the objective, 2 a g_i + a^2 H_ii - (g_j + a H_ij)^2 / H_jj, is
                      negative (g = (w - w') H_d, a the removed weight). N:M swaps stay inside one
                      group of M columns; unstructured ones inside one row, so every row (and every
                      layer) keeps its count of zeros. Then ``reconstruct``.

Whatever the mode, a row whose undampened error would rise keeps its pruned weights: the refit
never raises a layer's error. All math in float32 on the weights' device (CPU or CUDA).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.engine.contract.patterns import SparsityPattern

REFITS = ("none", "reconstruct", "swap+reconstruct")
CG_ITERATIONS = 32  # conjugate-gradient steps (stops earlier once every row's residual fell 1e-6x)
SWAP_ROUNDS = 8  # candidate evaluations per row
SWAPS_PER_ROUND = 16  # candidates tried per row and round, each re-checked exactly before it is made
CHUNK_ELEMENTS = 1 << 24  # rows per chunk of the swap search: at most this many pair scores at once


@dataclass
class RefitResult:
    weights: list[torch.Tensor]  # per layer (rows, cols) float32, same mask size as given
    before: list[float]  # per layer tr(dW H dW^T) of the pruned weights (undampened H)
    after: list[float]  # the same after the refit (never above ``before``)
    swaps: list[int]  # mask swaps made per layer
    dense: list[float]  # per layer tr(W H W^T): the scale of the relative errors


def row_errors(dense: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per row, (w - w') H (w - w')^T."""
    D = dense.float() - pruned.float()
    return (D.matmul(H.float()) * D).sum(1)


@torch.no_grad()
def refit_shared(
    dense: Sequence[torch.Tensor],
    pruned: Sequence[torch.Tensor],
    H: torch.Tensor,
    pattern: SparsityPattern,
    *,
    mode: str,
    percdamp: float = 0.01,
    iterations: int = CG_ITERATIONS,
    rounds: int = SWAP_ROUNDS,
) -> RefitResult:
    """Refit the layers that read one H (``dense[k]`` and ``pruned[k]`` of layer k).

    The zeros of ``pruned`` are its mask; ``reconstruct`` keeps them, ``swap+reconstruct`` moves
    some of them within the pattern (same row; same group of M for N:M).
    """
    if mode not in REFITS:
        raise ValueError(f"refit must be one of {', '.join(REFITS)}, got {mode!r}")
    W = torch.cat([w.float() for w in dense])
    P = torch.cat([p.float() for p in pruned])  # new tensors: the inputs are not modified
    bounds = [0, *itertools.accumulate(p.shape[0] for p in pruned)]
    segments = list(zip(bounds[:-1], bounds[1:]))
    H0 = H.float()
    before_rows = row_errors(W, P, H0)
    swaps = torch.zeros(W.shape[0], dtype=torch.long, device=W.device)
    if mode != "none":
        Hd = H0.clone()
        dead = torch.diag(Hd) == 0
        Hd[dead, dead] = 1
        idx = torch.arange(Hd.shape[0], device=Hd.device)
        Hd[idx, idx] += percdamp * torch.mean(torch.diag(H0)).clamp(min=0)
        start = P.clone()
        if mode == "swap+reconstruct":
            swaps = swap(W, P, Hd, pattern, dead, rounds=rounds)
        reconstruct(W, P, Hd, iterations=iterations)
        after_rows = row_errors(W, P, H0)
        worse = ~(after_rows <= before_rows)  # NaN counts as worse
        P[worse], after_rows[worse], swaps[worse] = start[worse], before_rows[worse], 0
    else:
        after_rows = before_rows
    return RefitResult(
        weights=[P[r0:r1] for r0, r1 in segments],
        before=[before_rows[r0:r1].sum().item() for r0, r1 in segments],
        after=[after_rows[r0:r1].sum().item() for r0, r1 in segments],
        swaps=[int(swaps[r0:r1].sum().item()) for r0, r1 in segments],
        dense=[q.sum().item() for q in (W.matmul(H0) * W).sum(1).split([r1 - r0 for r0, r1 in segments])],
    )


def refit_layers(
    dense: Sequence[torch.Tensor],
    pruned: Sequence[torch.Tensor],
    H: torch.Tensor,
    pattern: SparsityPattern,
    mode: str,
    percdamp: float,
    stats: Sequence[tuple],
):
    """The driver's call (worker.engine.sequential.solve_group): the refitted weights and each layer's
    (error, loss, percdamp, refit) with the relative error after the refit and, in ``refit``, the one
    before, the swaps made and the seconds (shared out by rows)."""
    t0 = time.perf_counter()
    damp = max([percdamp, *(s[2] for s in stats)])  # SparseGPT's, raised where its Cholesky needed more
    result = refit_shared(dense, pruned, H, pattern, mode=mode, percdamp=damp)
    if H.device.type == "cuda":
        torch.cuda.synchronize(H.device)
    seconds = time.perf_counter() - t0
    rows = [p.shape[0] for p in pruned]
    out = []
    for (_error, loss, used, _), before, after, dq, made, r in zip(
        stats, result.before, result.after, result.dense, result.swaps, rows
    ):
        out.append(
            (
                _relative(after, dq),
                loss,
                used,
                {
                    "mode": mode,
                    "error_before": _relative(before, dq),
                    "swaps": made,
                    "seconds": seconds * r / sum(rows),
                },
            )
        )
    return result.weights, out


def _relative(quad: float, dense_quad: float) -> float:
    return max(quad, 0.0) / dense_quad if dense_quad > 0 and dense_quad == dense_quad else 0.0


def reconstruct(W: torch.Tensor, P: torch.Tensor, Hd: torch.Tensor, *, iterations: int, tol: float = 1e-6) -> None:
    """Preconditioned CG on every row at once: P's nonzeros move to minimise (w - p) Hd (w - p)^T;
    its zeros stay zeros (in place)."""
    K = (P != 0).to(P.dtype)
    Minv = K / torch.diag(Hd).reshape(1, -1)
    R = (W - P).matmul(Hd).mul_(K)  # minus half the gradient, on the kept positions
    Z = R * Minv
    D = Z.clone()  # the search directions (zero off the mask)
    rz = (R * Z).sum(1)
    stop = tol * rz.clamp(min=0)
    for _ in range(iterations):
        AD = D.matmul(Hd).mul_(K)
        dAd = (D * AD).sum(1)
        alpha = torch.where(dAd > 0, rz / dAd, torch.zeros_like(dAd)).unsqueeze(1)
        P.add_(alpha * D)
        R.sub_(alpha * AD)
        torch.mul(R, Minv, out=Z)
        rz_new = (R * Z).sum(1)
        if bool((rz_new <= stop).all()):
            break
        beta = torch.where(rz > 0, rz_new / rz, torch.zeros_like(rz)).unsqueeze(1)
        D.mul_(beta).add_(Z)
        rz = rz_new
    P.mul_(K)  # exact zeros where pruned


def swap(
    W: torch.Tensor, P: torch.Tensor, Hd: torch.Tensor, pattern: SparsityPattern, dead: torch.Tensor, *, rounds: int
) -> torch.Tensor:
    """Mask swaps that lower (w - p) Hd (w - p)^T, in place on P; the swaps made per row."""
    rows, cols = P.shape
    width = pattern.m if pattern.structured else min(cols, 2 * SWAPS_PER_ROUND)
    chunk = max(1, CHUNK_ELEMENTS // max(1, cols * width))
    made = torch.zeros(rows, dtype=torch.long, device=P.device)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        made[r0:r1] = _swap_rows(W[r0:r1], P[r0:r1], Hd, pattern, dead, rounds)
    return made


def _swap_rows(W, P, Hd, pattern: SparsityPattern, dead, rounds: int) -> torch.Tensor:
    rows, cols = P.shape
    hd = torch.diag(Hd)
    G = (W - P).matmul(Hd)  # g = (w - p) Hd: the objective's half gradient in -p
    made = torch.zeros(rows, dtype=torch.long, device=P.device)
    ar = torch.arange(rows, device=P.device)
    for _ in range(rounds):
        f = ((W - P) * G).sum(1).clamp(min=0)  # the rows' objective: a swap must lower it by 1e-6 of it
        if pattern.structured:
            cand_i, cand_j = _group_candidates(P, G, Hd, hd, pattern, dead)
        else:
            cand_i, cand_j = _row_candidates(P, G, Hd, hd, dead)
        if cand_i is None:
            break
        any_made = False
        for c in range(cand_i.shape[1]):  # each candidate re-checked against the current p and g
            i, j = cand_i[:, c], cand_j[:, c]
            a = P[ar, i]
            gj, hij, hjj = G[ar, j], Hd[i, j], hd[j]
            delta = 2 * a * G[ar, i] + a * a * hd[i] - (gj + a * hij) ** 2 / hjj
            ok = (a != 0) & (P[ar, j] == 0) & (delta < -1e-6 * f) & torch.isfinite(delta)
            if not bool(ok.any()):
                continue
            any_made = True
            t = torch.where(ok, (gj + a * hij) / hjj, torch.zeros_like(a))
            a = torch.where(ok, a, torch.zeros_like(a))
            rows_ok = ar[ok]
            P[rows_ok, i[ok]] = 0
            P[rows_ok, j[ok]] = t[ok]
            G.add_(a.unsqueeze(1) * Hd[i] - t.unsqueeze(1) * Hd[j])
            made += ok.long()
        if not any_made:
            break
    return made


def _row_candidates(P, G, Hd, hd, dead):
    """Unstructured: per row the k cheapest removals x the k best regrowths, every pair scored exactly;
    the best pair for each of the k removals (k = SWAPS_PER_ROUND)."""
    rows, cols = P.shape
    kept = P != 0
    grow = ~kept & ~dead.reshape(1, -1)
    k = min(SWAPS_PER_ROUND, int(kept.sum(1).min().item()), int(grow.sum(1).min().item()))
    if k < 1:
        return None, None
    cost = (2 * P * G + P * P * hd).masked_fill_(~kept, float("inf"))
    gain = (G * G / hd).masked_fill_(~grow, -1.0)
    ci = torch.topk(cost, k, dim=1, largest=False).indices  # (rows, k)
    cj = torch.topk(gain, min(cols, 2 * k), dim=1).indices  # (rows, 2k)
    a = P.gather(1, ci).unsqueeze(2)
    score = cost.gather(1, ci).unsqueeze(2) - (
        G.gather(1, cj).unsqueeze(1) + a * Hd[ci.unsqueeze(2), cj.unsqueeze(1)]
    ) ** 2 / hd[cj].unsqueeze(1)
    score = score.masked_fill_(~grow.gather(1, cj).unsqueeze(1), float("inf"))
    picks = []  # removal c (cheapest first) gets the best regrowth no earlier removal took
    for c in range(k):
        best = score[:, c].argmin(1)
        picks.append(best)
        score[:, c + 1 :].scatter_(2, best.reshape(-1, 1, 1).expand(-1, k - c - 1, 1), float("inf"))
    return ci, cj.gather(1, torch.stack(picks, 1))


def _group_candidates(P, G, Hd, hd, pattern: SparsityPattern, dead):
    """N:M: every (kept i, pruned j) pair inside each full group of M scored exactly; per row the best
    pair of each of the best groups (at most SWAPS_PER_ROUND groups)."""
    rows, cols = P.shape
    m = pattern.m
    groups = cols // m
    if groups == 0:
        return None, None
    span = groups * m
    P3, G3 = P[:, :span].reshape(rows, groups, m), G[:, :span].reshape(rows, groups, m)
    h3 = hd[:span].reshape(groups, m)
    idx = torch.arange(span, device=P.device).reshape(groups, m)
    Hblk = Hd[idx.unsqueeze(2), idx.unsqueeze(1)]  # (groups, m, m): H_ij inside each group
    kept = P3 != 0
    grow = ~kept & ~dead[:span].reshape(1, groups, m)
    cost = (2 * P3 * G3 + P3 * P3 * h3).masked_fill_(~kept, float("inf"))
    score = cost.unsqueeze(3) - (G3.unsqueeze(2) + P3.unsqueeze(3) * Hblk) ** 2 / h3.unsqueeze(1)
    score.masked_fill_(~grow.unsqueeze(2), float("inf"))  # (rows, groups, i, j)
    flat = score.reshape(rows, groups, m * m)
    best_val, best_pos = flat.min(2)  # per group
    k = min(SWAPS_PER_ROUND, groups)
    top = torch.topk(best_val, k, dim=1, largest=False).indices  # (rows, k) groups
    pos = best_pos.gather(1, top)
    return top * m + pos // m, top * m + pos % m


def refit_summary(mode: str, layers: Sequence, sizes: Sequence[int]) -> dict:
    """The report's ``refit``: the mode, the layers' relative errors before and after it (means weighted
    by the layers' sizes), the swaps made and its seconds (part of the prune's)."""
    done = [(r.refit, r.error, n) for r, n in zip(layers, sizes) if r.refit is not None and r.error is not None]
    total = sum(n for _, _, n in done)
    # Pruned layers the refit did not touch are named, never folded into the figures above (none
    # is expected: fused MoE experts are refit one by one in worker.engine.moe; a guard).
    left = [r.name for r in layers if r.refit is None] if mode != "none" else []
    return {
        "mode": mode,
        "layers": len(done),
        "not_refit": left,
        "error_before": sum(f["error_before"] * n for f, _, n in done) / total if total else None,
        "error_after": sum(e * n for _, e, n in done) / total if total else None,
        "swaps": sum(f["swaps"] for f, _, _ in done),
        "seconds": sum(f["seconds"] for f, _, _ in done),
    }
