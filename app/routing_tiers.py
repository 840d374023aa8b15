"""The GPU-memory tiers that name the per-memory queues, shared by the workers (which consume
every tier they fit) and the API (which sends a job to the smallest tier that fits it)."""

from __future__ import annotations

import math

# GB (1e9 bytes), as nvidia-smi's MiB converted: an "80 GB" card has 85.5, a "24 GB" one 25.8.
TIERS = (4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 141, 192, 256, 384, 512, 768, 1024)


def tier_queue(base: str, tier: int) -> str:
    return f"{base}.gpu{tier}gb"


def tier_queues(base: str, memory_gb: float) -> list[str]:
    """Every tier at or below ``memory_gb``, and its own whole GB (the tier for a job that needs
    more than the tier below but no more than this worker has)."""
    own = math.floor(memory_gb)
    tiers = sorted({t for t in TIERS if t <= memory_gb} | ({own} if own >= 1 else set()))
    return [tier_queue(base, t) for t in tiers]


def plain_queue(base: str, tier: int) -> str:
    """A job that asked for no GPU, needing up to ``tier`` GB on a GPU: CPU-only workers consume
    every such queue, a GPU worker those of the tiers it fits (app/services/routing.py)."""
    return f"{base}.any{tier}gb"
