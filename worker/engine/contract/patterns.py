"""Sparsity patterns: a ratio for unstructured pruning, or N:M (N zeros in every M weights)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from worker.engine.errors import InvalidJob

_NM = re.compile(r"^\s*([0-9]{1,4})\s*:\s*([0-9]{1,4})\s*$")
_RATIO = re.compile(r"^[+-]?([0-9]*(\.[0-9]*)?([eE][+-]?[0-9]+)?|nan|inf|infinity)\s*%?$", re.I)
MAX_TEXT = 40  # a sparsity is written in a few characters ("0.5", "50%", "2:4"): longer text is refused unread
_EXPECTED = "a ratio strictly between 0 and 1 (0.5, 50%) or an N:M pattern (2:4, 4:8)"


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
    """'0.5' / 0.5 -> 50% unstructured; '2:4' -> 2 zeros in every 4 (SparseGPT's prunen:prunem).

    Refused with a reason, never an OverflowError: text longer than ``MAX_TEXT`` characters or
    not in ASCII, N or M of more than 4 digits, NaN, infinities, and numbers (a
    400-digit integer too) outside (0, 1)."""
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise InvalidJob(f"sparsity is {len(value)} characters long; expected {_EXPECTED}")
        if not value.isascii() or not value.isprintable():
            raise InvalidJob(f"sparsity must be plain text: {_EXPECTED}")
        match = _NM.match(value)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if not 0 < n < m:
                raise InvalidJob(f"sparsity pattern {value!r}: N:M needs 0 < N < M (for example 2:4 or 4:8)")
            if m > 128:
                raise InvalidJob(f"sparsity pattern {value!r}: M must be at most 128")
            return SparsityPattern(sparsity=n / m, n=n, m=m)
        text = value.strip()
        if not _RATIO.match(text) or not text.rstrip("%").strip():
            raise InvalidJob(f"sparsity {value!r} is neither a ratio (0.5) nor an N:M pattern (2:4, 4:8)")
        try:
            value = float(text.rstrip("%").strip()) / (100 if text.endswith("%") else 1)
        except ValueError:
            raise InvalidJob(f"sparsity {value!r} is neither a ratio (0.5) nor an N:M pattern (2:4, 4:8)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidJob(f"sparsity {_short(value)} is neither a ratio (0.5) nor an N:M pattern (2:4, 4:8)")
    if isinstance(value, int):  # never converted: float(10**400) overflows
        raise InvalidJob(f"sparsity {_short(value)} is out of range: a ratio must be strictly between 0 and 1")
    ratio = float(value)
    if not math.isfinite(ratio):
        raise InvalidJob(f"sparsity must be a finite number: {_EXPECTED}")
    if not 0.0 < ratio < 1.0:
        raise InvalidJob(f"sparsity {ratio:g} is out of range: a ratio must be strictly between 0 and 1")
    return SparsityPattern(sparsity=ratio)


def _short(value: object) -> str:
    """A value for a message: as it is when short, else its kind and size (never 400 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**12:
        return f"a {len(str(abs(value)))}-digit number" if abs(value) < 10**4000 else "a huge number"
    text = repr(value)
    return text if len(text) <= MAX_TEXT else f"{type(value).__name__} of {len(text)} characters"


# --- how the target spreads over the decoder blocks ----------------------------------------------

PROFILES = ("uniform", "owl")
MAX_PROFILE = 4096  # values in a per-block profile (more blocks than any decoder has)
_PROFILE_EXPECTED = (
    "uniform, owl, or one sparsity per decoder block separated by commas (0.6, 0.7, 0.8; a JSON list in the API)"
)


def parse_profile(value: object) -> str | tuple[float, ...]:
    """``"uniform"`` / ``"owl"``, or a per-block profile: a list of ratios, or text listing them
    ("0.6, 0.7", "[0.6, 0.7]"). Each value must be a finite ratio strictly between 0 and 1; the
    number of values is checked against the model's blocks once it is loaded."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in PROFILES:
            return text.lower()
        if len(text) > 24 * MAX_PROFILE or not text.isascii() or not text.isprintable():
            raise InvalidJob(f"sparsity_profile must be {_PROFILE_EXPECTED}")
        items: list[object] = [v.strip() for v in text.strip("[]() ").split(",")]
        if not text.strip("[]() ") or "," not in text and not _RATIO.match(text.strip("[]() ")):
            raise InvalidJob(f"sparsity_profile {_short(value)} is not {_PROFILE_EXPECTED}")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise InvalidJob(f"sparsity_profile {_short(value)} is not {_PROFILE_EXPECTED}")
    if not items or len(items) > MAX_PROFILE:
        raise InvalidJob(f"sparsity_profile has {len(items)} values: one per decoder block, at most {MAX_PROFILE}")
    out = []
    for b, item in enumerate(items):
        if isinstance(item, str) and not (item and _RATIO.match(item) and not item.endswith("%")):
            raise InvalidJob(
                f"sparsity_profile value {_short(item)} (block {b}) is not a number; expected {_PROFILE_EXPECTED}"
            )
        if isinstance(item, bool) or not isinstance(item, (int, float, str)) or isinstance(item, int):
            raise InvalidJob(
                f"sparsity_profile value {_short(item)} (block {b}) must be a ratio strictly between 0 and 1"
            )
        ratio = float(item)
        if not math.isfinite(ratio) or not 0.0 < ratio < 1.0:
            raise InvalidJob(
                f"sparsity_profile value {ratio:g} (block {b}) is out of range: "
                "each must be a finite ratio strictly between 0 and 1"
            )
        out.append(ratio)
    return tuple(out)
