"""The block steps of the SparseGPT solver: one block's columns masked, pruned (and quantized).

``worker.engine.sparsegpt.solve`` runs Algorithm 1 block by block and hands each block
``(W1, Hinv1, M1)`` to a ``BlockStep``, which returns ``(Q1, Err1)``: the block's pruned (and
quantized) weights and its scaled errors. Four steps, the same masks and weights up to float
rounding: ``block_column_loop`` (the reference's column loop, with quantization; used by
``worker.engine.reference``), ``_block_column_loop_quantized`` (the same loop in fewer ops and lazy
steps, with quantization), ``_block_column_loop_pruning`` (the same loop, lean, pruning only) and
``_block_solved`` (groups of columns as one triangular solve). ``fast_block_step`` picks one.
N:M masks are chosen group by group from the running weights (``worker.engine.quant.nm_lowest``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from worker.engine.contract.patterns import SparsityPattern
from worker.engine.quant import Quantizer, SolveGrids, nm_lowest

# (W1, Hinv1, M1) -> (Q1, Err1): one block's columns; fills M1 for N:M
BlockStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def fast_block_step(
    pattern: SparsityPattern, quantizer: Quantizer | SolveGrids | None, device: torch.device, column_loop: bool | None
) -> BlockStep:
    """The fast solver's block step: the column loop with quantization, else lean loop or solved blocks."""
    if quantizer is not None:
        return partial(_block_column_loop_quantized, pattern=pattern, quantizer=quantizer)
    # Measured on protocol P's layers (2 CPU threads, ms per block): unstructured, loop 786 vs
    # solved 659 (its mask is known up front, 16 columns a step); N:M, loop 914 vs solved 1077
    # (the mask follows the running weights, M columns a step). On a GPU the solved path's
    # batched triangular solve is one kernel for many columns, so it is used there for both.
    if column_loop is None:
        column_loop = pattern.structured and device.type == "cpu"
    return partial(_block_column_loop_pruning if column_loop else _block_solved, pattern=pattern)


def block_column_loop(W1, Hinv1, M1, pattern: SparsityPattern, quantizer: Quantizer | SolveGrids | None):
    """The reference's inner loop over the block's columns, with its operations; returns (Q1, Err1).

    Fills M1 for N:M. Used with quantization and by ``worker.engine.reference``.
    """
    count = W1.shape[1]
    n, m = pattern.n, pattern.m
    diag1 = torch.diag(Hinv1)
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    fits = set(quantizer.fits(count)) if quantizer is not None else set()
    for i in range(count):
        w = W1[:, i]
        d = Hinv1[i, i]
        if pattern.structured and i % m == 0 and i + m <= count:  # a ragged tail stays dense
            M1.scatter_(1, i + nm_lowest(W1[:, i : i + m], diag1[i : i + m], n), True)
        q = w.masked_fill(M1[:, i], 0)
        if quantizer is not None:
            if i in fits:
                quantizer.fit_at(i, W1.t(), Err1.t(), M1.t(), (n, m) if pattern.structured else None)
            q = quantizer.values(i, q)
        Q1[:, i] = q
        err1 = (w - q) / d
        W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
        Err1[:, i] = err1
    return Q1, Err1


SUBBLOCK_QUANTIZED = 16  # columns a step inside a block of the quantized column loop (then one product)


def _block_column_loop_quantized(W1, Hinv1, M1, pattern: SparsityPattern, quantizer: Quantizer | SolveGrids):
    """``block_column_loop`` with quantization in fewer, cheaper ops per column; equal up to float
    rounding (the reference path keeps the reference's operations).

    The block is held transposed (a column per contiguous row) and swept SUBBLOCK_QUANTIZED columns a
    step: inside a step each column's error updates the step's later columns (one rank-1 ``addr_``),
    and at its end one product updates the rest of the block, as the solve does between blocks. A
    step starts at every column where a group's grid is fitted, so the fit sees fully updated
    weights; for N:M every step is whole groups of M (else the block is one step).
    """
    count, rows = W1.shape[1], W1.shape[0]
    n, m = pattern.n, pattern.m
    nm = (n, m) if pattern.structured else None
    prunes = pattern.structured or pattern.sparsity > 0
    Wt, Mt = W1.t().contiguous(), M1.t().contiguous()
    Qt = torch.zeros(count, rows, dtype=W1.dtype, device=W1.device)
    Et = torch.zeros_like(Qt)
    fits = quantizer.fits(count)
    edges = sorted({*range(0, count, SUBBLOCK_QUANTIZED), *fits, count})
    if pattern.structured and any(e % m and e != count for e in edges):
        edges = [0, count]
    fit_at = set(fits)
    diag1 = torch.diag(Hinv1)
    w_cols, q_cols, e_cols, m_cols = Wt.unbind(0), Qt.unbind(0), Et.unbind(0), Mt.unbind(0)
    d_cols, h_rows = diag1.unbind(0), Hinv1.unbind(0)
    for a, b in zip(edges[:-1], edges[1:]):
        for i in range(a, b):
            if pattern.structured and i % m == 0 and i + m <= count:  # a ragged tail stays dense
                lowest = nm_lowest(Wt[i : i + m].t(), diag1[i : i + m], n)  # (rows, n)
                Mt.scatter_(0, (i + lowest).t(), True)
            if i in fit_at:
                quantizer.fit_at(i, Wt, Et, Mt, nm)
            w = w_cols[i]
            q = quantizer.values(i, w.masked_fill(m_cols[i], 0) if prunes else w, out=q_cols[i])
            err1 = torch.sub(w, q, out=e_cols[i]).div_(d_cols[i])
            if i + 1 < b:
                Wt[i + 1 : b].addr_(h_rows[i][i + 1 : b], err1, alpha=-1)
        if b < count:
            Wt[b:].addmm_(Hinv1[a:b, b:].t(), Et[a:b], alpha=-1)
    if pattern.structured:
        M1.copy_(Mt.t())
    return Qt.t(), Et.t()


def _block_column_loop_pruning(W1, Hinv1, M1, pattern: SparsityPattern):
    """The same loop without quantization, in three small ops per column (``W1`` is updated in place).

    A kept weight has q = w, so err = (w * pruned) / d, the reference's value; the update of
    column i itself leaves w there (kept) or ~0 (pruned, set to exactly 0 at the end), so the
    running ``W1`` ends as Q1. The per-column views are made once per block.
    """
    count = W1.shape[1]
    n, m = pattern.n, pattern.m
    diag1 = torch.diag(Hinv1)
    Err1 = torch.empty_like(W1)
    pruned = M1.to(W1.dtype)  # 1 where pruned
    err_cols, pruned_cols, w_cols, d_cols = Err1.unbind(1), pruned.unbind(1), W1.unbind(1), diag1.unbind(0)
    for i in range(count):
        if pattern.structured and i % m == 0 and i + m <= count:  # a ragged tail stays dense
            lowest = nm_lowest(W1[:, i : i + m], diag1[i : i + m], n)
            M1[:, i : i + m].scatter_(1, lowest, True)
            pruned[:, i : i + m].scatter_(1, lowest, 1.0)
        err1 = torch.mul(w_cols[i], pruned_cols[i], out=err_cols[i]).div_(d_cols[i])
        W1[:, i:].addr_(err1, Hinv1[i, i:], alpha=-1)
    return W1.masked_fill_(M1, 0), Err1


SUBBLOCK = 16  # columns per step of an unstructured block in the solved path


def _block_solved(W1, Hinv1, M1, pattern: SparsityPattern):
    """The same block without a Python step per column; returns (Q1, Err1). Fills M1 for N:M.

    Without quantization a kept weight has no error (q = w), so the loop's errors E solve,
    row by row, the triangular system "for each pruned i: sum_{k<=i} E_k U_ki = W1_i" with
    U = Hinv1 (upper), and the kept weights end as W1 - E U. The mask of an N:M group depends
    on the running weights, so groups are solved in order (M columns a step); an
    unstructured block's mask is known up front, and it is solved SUBBLOCK columns a step,
    which keeps the per-row triangular systems small.
    """
    rows, count = W1.shape
    step = pattern.m if pattern.structured else SUBBLOCK
    diag1 = torch.diag(Hinv1)
    E = torch.zeros_like(W1)
    Q1 = W1.clone()  # a ragged N:M tail stays as it is
    for g in range(0, count, step):
        h = min(g + step, count)
        Wg = W1[:, g:h]  # the running weights: every earlier step's update is applied
        if pattern.structured:
            if h - g < pattern.m:
                break  # a ragged tail stays dense
            M1[:, g:h].scatter_(1, nm_lowest(Wg, diag1[g:h], pattern.n), True)
        Ug = Hinv1[g:h, g:h]
        Eg = _masked_forward_substitution(Wg, Ug, M1[:, g:h])
        E[:, g:h] = Eg
        Q1[:, g:h] = (Wg - Eg.matmul(Ug)).masked_fill_(M1[:, g:h], 0)
        if h < count:
            W1[:, h:] -= Eg.matmul(Hinv1[g:h, h:])
    return Q1, E


def _masked_forward_substitution(Wg: torch.Tensor, U: torch.Tensor, Mg: torch.Tensor) -> torch.Tensor:
    """Per row r: E_r with E_ri = 0 where kept, and sum_{k<=i} E_rk U_ki = Wg_ri where pruned.

    Solved as one batched lower-triangular system T_r E_r = (Mg * Wg)_r with
    T_r = diag(Mg_r) U^T + diag(1 - Mg_r), in row chunks of at most 64 MB.
    """
    rows, k = Wg.shape
    out = torch.empty_like(Wg)
    eye = torch.eye(k, dtype=Wg.dtype, device=Wg.device)
    chunk = max(1, (1 << 24) // (k * k))
    for r0 in range(0, rows, chunk):
        m = Mg[r0 : r0 + chunk].to(Wg.dtype)  # (r, k)
        T = m.unsqueeze(2) * U.t().unsqueeze(0) + (1 - m).unsqueeze(2) * eye  # (r, k, k), lower
        rhs = (m * Wg[r0 : r0 + chunk]).unsqueeze(2)
        out[r0 : r0 + chunk] = torch.linalg.solve_triangular(T, rhs, upper=False).squeeze(2)
    return out
