"""Sparsity patterns: a ratio for unstructured pruning, or N:M (N zeros in every M weights)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.engine.errors import InvalidJob

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    sparsity: float  # fraction of the weights set to zero
    n: int = 0  # N:M only: zeros in each group of m consecutive input columns (0: unstructured)
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.n > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.sparsity:g}"


def parse_sparsity(value: str | float) -> SparsityPattern:
    """'0.5' / 0.5 -> 50% unstructured; '2:4' -> 2 zeros in every 4 (SparseGPT's prunen:prunem)."""
    if isinstance(value, str):
        match = _NM.match(value)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if not 0 < n < m:
                raise InvalidJob(f"sparsity pattern {value!r}: N:M needs 0 < N < M (for example 2:4 or 4:8)")
            if m > 128:
                raise InvalidJob(f"sparsity pattern {value!r}: M must be at most 128")
            return SparsityPattern(sparsity=n / m, n=n, m=m)
        try:
            value = float(value.strip().rstrip("%")) / (100 if value.strip().endswith("%") else 1)
        except ValueError:
            raise InvalidJob(
                f"sparsity {value!r} is neither a ratio (0.5) nor an N:M pattern (2:4, 4:8)"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidJob(f"sparsity {value!r} is neither a ratio (0.5) nor an N:M pattern (2:4, 4:8)")
    ratio = float(value)
    if not 0.0 < ratio < 1.0:
        raise InvalidJob(f"sparsity {ratio:g} is out of range: a ratio must be strictly between 0 and 1")
    return SparsityPattern(sparsity=ratio)
