"""Which queue a job goes to, decided when it is submitted, from the workers alive now.

- ``resources.queue``: that queue, if some live worker consumes it;
- else, when live workers advertise GPU memory (worker/gpus.py): the job needs
  max(its GPU estimate, ``resources.min_gpu_memory_gb``) and goes to the smallest memory tier
  at or above that need, which only workers with that much memory consume; none fits: refused
  with the numbers (422) instead of waiting forever;
- a job that asks for no GPU memory while CPU-only workers are live goes to any worker that fits
  it: the shared queue when every live GPU worker fits it, else the plain tier queue
  ``<queue>.any<T>gb`` (T: the smallest tier at or above its GPU estimate), which CPU-only workers
  and the GPU workers of at least T GB consume (worker/gpus.py). One GPU worker does not draw
  plain jobs away from the CPU workers;
- else (CPU-only workers, or none yet) the shared queue, as on one machine; a job that asks for
  GPU memory then is refused.

The GPU estimate is the part of the engine's memory estimate that sits on the GPU: the block in
flight (its weights, the largest Hessians and the solve) plus the calibration or evaluation
activations (worker/engine/contract/estimate.py; the weights of the whole model stay in host memory).
The queue chosen is kept in the stored spec (``resources.queue``), so the sweeper's requeues
and re-sends go to the same place.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from app.config import Settings
from app.routing_tiers import TIERS, plain_queue, tier_queue
from app.workers import live_workers
from worker.engine.contract.estimate import GB, Estimate

log = logging.getLogger(__name__)
_clients: dict[str, redis.Redis] = {}


def _redis(settings: Settings) -> redis.Redis:
    client = _clients.get(settings.redis)
    if client is None:
        client = _clients[settings.redis] = redis.Redis.from_url(
            settings.redis, decode_responses=True, socket_connect_timeout=2, socket_timeout=5
        )
    return client


def gpu_need_gb(found: Estimate | None) -> float | None:
    if found is None or found.problem:
        return None
    return (found.activations + found.block) / GB


def _gb(value: float) -> str:
    return f"{value:.3g} GB" if value < 10 else f"{value:,.0f} GB"


def choose_queue(
    settings: Settings, resources: dict[str, Any], found: Estimate | None, workers: list[dict[str, Any]] | None = None
) -> tuple[str, str | None]:
    """(queue, None), or (the shared queue, the refusal in words)."""
    if workers is None:
        try:
            workers = live_workers(_redis(settings))
        except redis.RedisError as err:  # the send fails next with 503; no routing without Redis
            log.warning("workers unknown (Redis: %s): the shared queue", err)
            return settings.queue, None
    named = resources.get("queue")
    if named:
        if consumed(named, workers):
            return named, None
        return settings.queue, (
            f"no live worker consumes the queue {named!r} (live workers: "
            f"{listing(workers) or 'none'}); start one with sparsegpt worker --queue {named}"
        )
    asked = resources.get("min_gpu_memory_gb")
    gpu_workers = [w for w in workers if isinstance(w.get("memory_gb"), (int, float)) and w["memory_gb"] > 0]
    if not gpu_workers:
        if asked:
            return settings.queue, (
                f"the job asks for a GPU with at least {_gb(asked)} but no live worker "
                f"advertises a GPU (live workers: {listing(workers) or 'none'})"
            )
        return settings.queue, None
    estimate = gpu_need_gb(found)
    if not asked and len(gpu_workers) < len(workers):
        return _any_worker(settings, estimate or 0.0, gpu_workers), None
    need = max(estimate or 0.0, float(asked or 0.0))
    fit = [w for w in gpu_workers if w["memory_gb"] >= need]
    why = (
        f"it needs {_gb(need)} of GPU memory ("
        + (f"estimate {_gb(estimate)}: {'; '.join(found.parts)}" if estimate is not None else "no estimate")
        + (f"; asked at least {_gb(asked)}" if asked else "")
        + ")"
    )
    if not fit:
        return settings.queue, (
            f"no live worker can take this job: {why}, and the largest GPU of a live worker "
            f"has {_gb(max(w['memory_gb'] for w in gpu_workers))} ({listing(gpu_workers)})"
        )
    tier = next((t for t in TIERS if t >= need), None)
    queue = tier_queue(settings.queue, tier) if tier is not None else None
    if queue is None or not consumed(queue, fit):
        # Between two tiers: the whole-GB queue of a fitting worker (each consumes its own).
        own = [w for w in fit if int(w["memory_gb"]) >= need]
        if not own:
            return settings.queue, f"no live worker can take this job: {why} ({listing(gpu_workers)})"
        queue = tier_queue(settings.queue, int(min(w["memory_gb"] for w in own)))
    return queue, None


def _any_worker(settings: Settings, need: float, gpu_workers: list[dict[str, Any]]) -> str:
    """A plain job's queue while CPU-only workers are live: every worker that fits it consumes it."""
    if all(w["memory_gb"] >= need for w in gpu_workers):
        return settings.queue
    tier = next((t for t in TIERS if t >= need), TIERS[-1])
    return plain_queue(settings.queue, tier)


def consumed(queue: str, workers: list[dict[str, Any]]) -> bool:
    """Whether one of ``workers`` (their heartbeats) consumes ``queue``."""
    return any(queue in (w.get("queues") or []) for w in workers)


def listing(workers: list[dict[str, Any]]) -> str:
    """The workers in a message: name and GPU memory (or CPU only), the first 12."""
    return ", ".join(
        f"{w.get('name', '?')} ({_gb(w['memory_gb']) if w.get('memory_gb') else 'CPU only'})" for w in workers[:12]
    )
