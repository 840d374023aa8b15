"""Weight quantization grids: compressed-tensors' symmetric INT and FP8 grids, and the solve's grids.

The formulas are compressed-tensors 0.20.1's (../shared/QUANTIZATION.md 1.4, 2.3): per group of
``group_size`` input columns of a row (or per row: ``group_size`` -1),

- INT b bits: amax = max |x| over the group (0 included), s = amax / ((2^b - 1) / 2), zero point 0,
  code q = round(clamp(x / s, -2^(b-1), 2^(b-1) - 1)), value q * s;
- FP8 e4m3: s = amax / 448, code = clamp(x / s, -448, 448) cast to float8_e4m3fn, value code * s.

For the integer grids the engine then searches the scale ("mse" in ``Quantization.fit``): amax
shrunk by up to 19% where that brings the group's rounded values nearer. The scale is rounded to
the dtype the checkpoint stores it in before it is used (QUANTIZATION.md 1.3), and a zero scale
(an all-zero group) becomes that dtype's eps, as compressed-tensors does.
Zero is on every grid: a pruned weight quantizes to code 0 and value exactly 0.

``Quantizer`` is the older ``wbits`` grid (the SparseGPT reference's per-row asymmetric min-max).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SCHEMES = {"W4A16": ("int", 4), "W8A16": ("int", 8), "FP8_DYNAMIC": ("float", 8)}
FP8_MAX = 448.0  # largest float8_e4m3fn
OBSERVERS = ("mse", "minmax")  # how a group's scale is chosen (Quantization.fit)
MSE_STEPS, MSE_NORM = 20, 2.4  # "mse": the max shrunk by 0..19%, error sum |q(x) - x|^2.4


@dataclass(frozen=True)
class Quantization:
    """What to quantize to: a compressed-tensors preset's weight grid, its groups and column order.

    ``group_size`` -1 is one scale per output row (compressed-tensors' "channel" strategy); FP8 is
    always per row. ``actorder`` solves columns in descending diag(H) order with static groups
    (every group's grid fitted before the sweep: no g_idx on disk). ``scale_dtype`` is the dtype
    the checkpoint stores the scales in (the saved model's: fp16, bf16 or fp32). ``observer``: how a
    group's scale is chosen (``fit``): the preset's "minmax" by default; the engine's jobs search
    ("mse") for the integer grids (worker.engine.quantized_job.quantization_of).
    """

    scheme: str = "W4A16"
    group_size: int = 128
    actorder: bool = False
    scale_dtype: torch.dtype = torch.bfloat16
    observer: str = "minmax"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        if self.type == "float" and self.group_size != -1:
            raise ValueError(
                f"{self.scheme} has one scale per output channel: group_size must be -1, not {self.group_size}"
            )
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(
                f"group_size must be a positive number of columns or -1 (per channel), not {self.group_size}"
            )
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer {self.observer!r} is not one of {', '.join(OBSERVERS)}")
        if self.scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"scales are stored as float16, bfloat16 or float32, not {self.scale_dtype}")

    @property
    def type(self) -> str:  # "int" | "float"
        return SCHEMES[self.scheme][0]

    @property
    def bits(self) -> int:
        return SCHEMES[self.scheme][1]

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.type == "int" else torch.float8_e4m3fn

    @property
    def qmax(self) -> float:  # the largest code; the smallest is -qmax - 1 (INT) or -qmax (FP8)
        return 2.0 ** (self.bits - 1) - 1 if self.type == "int" else FP8_MAX

    def group_width(self, columns: int) -> int:
        """Columns per group for a layer ``columns`` wide; refuses a group size that does not divide it."""
        if self.group_size == -1:
            return columns
        if columns % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide the layer's {columns} input columns")
        return self.group_size

    def fit(self, Wg: torch.Tensor) -> torch.Tensor:
        """``Wg`` (rows, k): one group of each row -> its scale (rows,), fp32 holding ``scale_dtype`` values.

        "minmax": the largest |x| lands on the grid's end. "mse": of that scale shrunk by 0% to
        19% in steps of 1% (each rounded to ``scale_dtype``), the one whose rounded group is
        nearest the group in sum |q(x) - x|^2.4 (GPTQ's and llm-compressor's "mse" search); a tie
        keeps the larger. Clipping the few largest weights buys finer steps for all the others.
        """
        amax = Wg.detach().abs().amax(dim=1).float()  # = max(|min(x, 0)|, max(x, 0))
        scale = self._scale(amax)
        if self.observer == "minmax":
            return scale
        x = Wg.detach().float()
        best = self._error(x, scale)
        for step in range(1, MSE_STEPS):
            candidate = self._scale(amax * (1 - step / 100))
            error = self._error(x, candidate)
            better = error < best
            best, scale = torch.where(better, error, best), torch.where(better, candidate, scale)
        return scale

    def fit_groups(self, W: torch.Tensor) -> torch.Tensor:
        """Every group of ``W`` (rows, cols) at once -> scales (rows, cols / group)."""
        rows, cols = W.shape
        g = self.group_width(cols)
        return self.fit(W.reshape(rows * (cols // g), g)).reshape(rows, cols // g)

    def _scale(self, amax: torch.Tensor) -> torch.Tensor:
        half_range = (2.0**self.bits - 1) / 2 if self.type == "int" else FP8_MAX  # (qmax - qmin) / 2
        scale = (amax / half_range).to(self.scale_dtype)
        scale = torch.where(scale == 0, torch.finfo(self.scale_dtype).eps, scale)
        return scale.float()

    def _error(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        scale = scale.unsqueeze(1)
        return self.rounded_(x / scale).mul_(scale).sub_(x).abs_().pow_(MSE_NORM).sum(dim=1)

    def codes(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``x`` (rows, ...) on the grid of ``scale`` (rows,) or broadcastable -> codes in ``code_dtype``."""
        if scale.dim() == 1 and x.dim() == 2:
            scale = scale.unsqueeze(1)
        return self.rounded_(x.float() / scale).to(self.code_dtype)

    def rounded_(self, scaled: torch.Tensor) -> torch.Tensor:
        """``x / scale`` (fp32), in place -> its codes as fp32 values (exact in fp32 for both grids); a code
        0 is +0, so the weights it makes (code x scale) are the stored codes' own, byte for byte."""
        if self.type == "int":
            return scaled.clamp_(-self.qmax - 1, self.qmax).round_().add_(0.0)
        # A value below half the smallest subnormal rounds to zero, keeping its sign; -0 + 0 is +0, the code
        # compressed-tensors stores (it adds the zero point), so the checkpoint holds these very codes.
        return scaled.copy_(scaled.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)).add_(0.0)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """Codes (rows, cols) and scales (rows, cols / group) -> fp32 values (exact: q * s fits fp32)."""
    return codes.float() * scale.float().repeat_interleave(group, dim=1)


@dataclass
class QuantizedWeight:
    """One layer on its grid: what the exporter packs and what the evaluated model holds."""

    codes: torch.Tensor  # (rows, cols) int8 (INT) or float8_e4m3fn (FP8)
    scale: torch.Tensor  # (rows, cols / group) in the quantization's scale_dtype
    weight: torch.Tensor  # (rows, cols) fp32: codes * scale, exactly

    @classmethod
    def of(cls, codes: torch.Tensor, scale: torch.Tensor, quantization: Quantization) -> QuantizedWeight:
        group = codes.shape[1] // scale.shape[1]
        return cls(codes=codes, scale=scale.to(quantization.scale_dtype), weight=dequantize(codes, scale, group))


@torch.no_grad()
def round_to_nearest(W: torch.Tensor, quantization: Quantization) -> QuantizedWeight:
    """A weight (pruned or not) on its grid without any solve: the wanda / magnitude / ria path.

    Every group's grid is fitted to ``W`` itself; zeros stay exactly zero (code 0).
    """
    W = W.float()
    rows, cols = W.shape
    g = quantization.group_width(cols)
    groups = W.reshape(rows, cols // g, g)
    scale = quantization.fit_groups(W)  # (rows, groups)
    codes = quantization.codes(groups, scale.unsqueeze(2)).reshape(rows, cols)
    return QuantizedWeight.of(codes, scale, quantization)


class SolveGrids:
    """The grids of one joint solve (stacked rows), as SparseGPT's column loop reaches each column.

    Without act order each group's grid is refitted at its first column from the running weights
    (every earlier OBS update applied: the in-block ones from the block's running weights, the lazy
    ones of the current block computed for columns past it), i.e. GPTQ's refit when groups and blocks
    align. With act order (and per-channel grids) all grids are fitted before the sweep, in original
    column order, and each column keeps its original group (GPTQ's --static-groups). ``perm[j]``: the
    original column solved at position j (None: original order). Codes are kept in solve order.

    The column loop (worker.engine.block_steps) calls, per column ``i`` of the block: ``fit_at`` where
    ``fits(count)`` says (a group's first column), then ``values``. It hands the block's running
    weights, errors and mask transposed, a column per row: ``Wt``, ``Et``, ``Mt`` (count, rows).
    """

    def __init__(self, quantization: Quantization, W: torch.Tensor, perm: torch.Tensor | None):
        rows, cols = W.shape
        self.quantization = quantization
        self.group = quantization.group_width(cols)
        self.static = perm is not None or self.group == cols
        group_of = (perm if perm is not None else torch.arange(cols, device=W.device)).div(
            self.group, rounding_mode="floor"
        )
        self.scales = (  # static: all fitted now, W in original order; else each as the solve reaches it
            quantization.fit_groups(W.float())
            if self.static
            else torch.zeros(rows, cols // self.group, dtype=torch.float32, device=W.device)
        )
        # per column in solve order: its code values (a contiguous row each) and its group's scales (a view)
        self.codes_t = torch.zeros(cols, rows, dtype=torch.float32, device=W.device)
        self._code_rows = self.codes_t.unbind(0)
        scale_cols = self.scales.unbind(1)
        self._scale_of = [scale_cols[g] for g in group_of.tolist()]
        self._block: tuple[torch.Tensor, torch.Tensor, int, int] | None = None

    def begin_block(self, W: torch.Tensor, Hinv: torch.Tensor, i1: int, i2: int) -> None:
        """The solve's W (lazy updates of earlier blocks applied) and Hinv as block i1:i2 starts."""
        self._block = (W, Hinv, i1, i2)

    def fits(self, count: int) -> list[int]:
        """The block's columns (0..count) where a group's grid is fitted: none when they are static."""
        i1 = self._block[2]
        return [] if self.static else [i for i in range(count) if (i1 + i) % self.group == 0]

    def fit_at(self, i: int, Wt: torch.Tensor, Et: torch.Tensor, Mt: torch.Tensor, nm: tuple[int, int] | None) -> None:
        """Fit the grid of the group starting at block column ``i``: ``Wt`` the block's running weights
        (every update so far applied to columns i..), ``Et`` its errors (columns ..i), ``Mt`` its mask so
        far, all transposed; ``nm``: (n, m) of an N:M pattern, whose masks are chosen m columns at a time
        (None: the block's mask is whole already)."""
        W, Hinv, i1, i2 = self._block
        c = i1 + i
        end = min(c + self.group, W.shape[1])
        running = Wt[i : i + end - c].t()  # the block's own columns, fully updated
        # The weights the solve will prune get no say in the grid: the block's mask, and for N:M
        # the groups not reached yet predicted by the solve's own rule on the running weights.
        running = running.masked_fill(_pruned_ahead(running, Mt[i : i + end - c].t(), Hinv, c, nm), 0)
        if end > i2:  # columns past the block still owe this block's updates so far
            later = W[:, i2:end] - Et[:i].t().matmul(Hinv[i1:c, i2:end])
            running = torch.cat([running, later], dim=1)
        self.scales[:, c // self.group] = self.quantization.fit(running)

    def values(self, i: int, q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Block column ``i``: ``q`` (masked entries 0) -> its values on the grid (into ``out``); codes
        recorded."""
        c = self._block[2] + i
        scale, codes = self._scale_of[c], self._code_rows[c]
        self.quantization.rounded_(torch.div(q, scale, out=codes))
        return torch.mul(codes, scale, out=out)

    def result(self, rows: slice, inverse: torch.Tensor | None) -> QuantizedWeight:
        """The layer in ``rows``: codes in original column order, scales in the scale dtype."""
        codes = self.codes_t.t()[rows] if inverse is None else self.codes_t[inverse].t()[rows]
        return QuantizedWeight.of(
            codes.to(self.quantization.code_dtype).contiguous(), self.scales[rows], self.quantization
        )


@dataclass
class Quantizer:
    """The ``wbits`` grid: per output channel, asymmetric min-max, found once from the dense weight
    (the SparseGPT reference's). The zero point is an integer, so a pruned 0 stays exactly 0."""

    scale: torch.Tensor  # (rows, 1)
    zero: torch.Tensor  # (rows, 1)
    maxq: int

    @classmethod
    def fit(cls, W: torch.Tensor, bits: int) -> Quantizer:
        if not 2 <= bits <= 8:
            raise ValueError(f"wbits must be between 2 and 8, got {bits}")
        maxq = 2**bits - 1
        xmin = W.min(dim=1).values.clamp(max=0)
        xmax = W.max(dim=1).values.clamp(min=0)
        both_zero = (xmin == 0) & (xmax == 0)
        xmin[both_zero], xmax[both_zero] = -1.0, 1.0
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / scale)
        return cls(scale=scale.unsqueeze(1), zero=zero.unsqueeze(1), maxq=maxq)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """``w``: one column (rows,) -> its value on the grid."""
        scale, zero = self.scale[:, 0], self.zero[:, 0]
        q = torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)
        return scale * (q - zero)

    def fits(self, count: int) -> list[int]:
        """``SolveGrids``' contract: one grid, fitted before the solve."""
        return []

    def values(self, i: int, q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``SolveGrids.values``' contract: ``q`` on the one grid."""
        v = self.quantize(q)
        return v if out is None else out.copy_(v)


def nm_lowest(Wg: torch.Tensor, diag_g: torch.Tensor, n: int) -> torch.Tensor:
    """The N:M rule: per row and group of M columns (the last dim of ``Wg``; ``diag_g`` the groups'
    [H^-1]_jj, broadcast against it), the positions of the n lowest scores w^2 / [H^-1]_jj^2."""
    score = Wg**2 / diag_g**2
    return torch.topk(score, n, dim=-1, largest=False)[1]


def _pruned_ahead(
    running: torch.Tensor, known: torch.Tensor, Hinv: torch.Tensor, c: int, nm: tuple[int, int] | None
) -> torch.Tensor:
    """Which of ``running`` (the block's columns c.. of a group) the solve will prune: ``known`` (the
    mask chosen so far) and, for N:M, in each whole group of m columns the n lowest w^2 / [H^-1]_jj^2
    (``nm_lowest``, the solve's own rule) of the running weights."""
    if nm is None:
        return known
    n, m = nm
    rows, width = running.shape
    whole = width - width % m
    if whole == 0:
        return known
    d = torch.diagonal(Hinv)[c : c + whole].reshape(-1, m)
    ahead = torch.zeros(rows, whole // m, m, dtype=torch.bool, device=running.device)
    ahead.scatter_(2, nm_lowest(running[:, :whole].reshape(rows, -1, m), d, n), True)
    predicted = known.clone()
    predicted[:, :whole] |= ahead.reshape(rows, whole)
    return predicted


# --- a resumed job's grids (worker.engine.sequential: beside the per-block checkpoints) ---------


def _grids_file(directory, i: int):
    return Path(directory) / f"quantized-{i:05d}.safetensors"


def save_quantized(directory, i: int, grids: dict[str, QuantizedWeight]) -> None:
    """Block ``i``'s codes and scales beside its checkpoint (the weights alone cannot give them back)."""
    tensors = {
        f"{name}:{part}": getattr(q, part).contiguous() for name, q in grids.items() for part in ("codes", "scale")
    }
    path = _grids_file(directory, i)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def restore_quantized(directory, blocks: int) -> dict[str, QuantizedWeight]:
    """The codes and scales of the blocks before ``blocks`` that a resumed run does not solve again."""
    out: dict[str, QuantizedWeight] = {}
    for i in range(blocks):
        path = _grids_file(directory, i)
        if not path.exists():
            continue  # a block left unpruned (the selection) has none
        tensors = load_file(str(path))
        for key in tensors:
            name, part = key.rsplit(":", 1)
            if part == "codes":
                codes, scale = tensors[key], tensors[f"{name}:scale"]
                group = codes.shape[1] // scale.shape[1]
                out[name] = QuantizedWeight(
                    codes=codes, scale=scale, weight=codes.float() * scale.float().repeat_interleave(group, dim=1)
                )
    return out
