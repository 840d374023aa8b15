"""How values read on the pages: times, durations, sizes, perplexities, a progress bar.

Registered as Jinja2 filters (``time``, ``duration``, ``secs``, ``bytes``, ``ppl``) and the
``progress_view`` global by ``app.web.render``.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any


def fmt_time(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def fmt_secs(seconds: float | None) -> str:
    """Short timings with decimals, long ones as a duration."""
    if seconds is None or not math.isfinite(seconds):
        return "–"
    return f"{seconds:.2f}s" if seconds < 60 else fmt_duration(seconds)


def fmt_bytes(size: int | float | None) -> str:
    if size is None:
        return ""
    size = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def fmt_ppl(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.2f}" if value < 1000 else f"{value:.4g}"


def progress_view(progress: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a progress bar shows: percent, stage, block i of n, module, ETA."""
    if not progress:
        return None
    fraction = progress.get("fraction")
    layer, layers = progress.get("layer"), progress.get("layers")
    return {
        "percent": round(100 * fraction, 1) if isinstance(fraction, (int, float)) else None,
        "stage": progress.get("stage") or "",
        "block": (f"block {layer + 1} of {layers}" if isinstance(layer, int) and isinstance(layers, int) else ""),
        "module": progress.get("module") or "",
        "eta": fmt_duration(progress.get("eta_s")),
        "elapsed": fmt_duration(progress.get("elapsed_s")),
        "message": progress.get("message") or "",
    }
