"""Where a queued job stands: its place in its queue and a rough start time.

The start time comes from this server's past jobs of the same model: their mean seconds per
pruned block (started -> finished over the blocks they pruned) times the blocks of each job ahead
(a running one: its own ETA while it reports one). Jobs ahead share the queue's live workers.
Without a past job of a model ahead, the start is "unknown". Read-only queries of the job rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import QUEUED, RUNNING, SUCCEEDED, Job, ModuleResult
from app.services.routing import consumed
from app.web.filters import fmt_duration
from app.workers import live_workers

HISTORY = 200  # the latest succeeded jobs the estimate reads
MAX_QUEUED = 1000  # queued jobs looked at (a queue longer than this: its tail has no position)


@dataclass(frozen=True)
class Standing:
    """A queued job's place: ``position`` of ``queued`` in ``queue``; ``start_s``: seconds from now, or None."""

    queue: str
    position: int
    queued: int
    start_s: float | None

    @property
    def start(self) -> str:
        if self.start_s is None:
            return "unknown"
        return "now" if self.start_s < 1 else f"in about {fmt_duration(self.start_s)}"


@dataclass(frozen=True)
class Pace:
    seconds_per_block: float
    blocks: int  # the model's blocks (the highest block a past job pruned, + 1)


def history(session: Session) -> dict[str, Pace]:
    """model -> its pace, from the latest ``HISTORY`` succeeded jobs that pruned some block."""
    done = session.execute(
        select(Job.id, Job.model, Job.started_at, Job.finished_at)
        .where(Job.status == SUCCEEDED, Job.started_at.is_not(None), Job.finished_at.is_not(None))
        .order_by(Job.finished_at.desc())
        .limit(HISTORY)
    ).all()
    if not done:
        return {}
    counts = {
        job_id: (n, top)
        for job_id, n, top in session.execute(
            select(ModuleResult.job_id, func.count(func.distinct(ModuleResult.block)), func.max(ModuleResult.block))
            .where(ModuleResult.job_id.in_([row.id for row in done]))
            .group_by(ModuleResult.job_id)
        )
    }
    totals: dict[str, list[float]] = {}  # model -> [seconds, blocks pruned, the model's blocks]
    for row in done:
        if row.id not in counts:
            continue
        pruned, top = counts[row.id]
        entry = totals.setdefault(row.model, [0.0, 0, 0])
        entry[0] += max(0.0, (row.finished_at - row.started_at).total_seconds())
        entry[1] += pruned
        entry[2] = max(entry[2], top + 1)
    return {model: Pace(seconds / blocks, int(size)) for model, (seconds, blocks, size) in totals.items() if blocks}


def _blocks(job: Job, pace: Pace) -> int:
    """The blocks ``job`` will prune: the model's, within its spec's first_block .. last_block."""
    layers = (job.spec or {}).get("layers") or {}
    first, last = layers.get("first_block"), layers.get("last_block")
    first = first if isinstance(first, int) and 0 <= first < pace.blocks else 0
    last = last if isinstance(last, int) and first <= last < pace.blocks else pace.blocks - 1
    return last - first + 1


def _seconds_left(job: Job, paces: dict[str, Pace], progress: dict[str, Any] | None, now: float) -> float | None:
    """How long ``job`` (queued or running) still takes, or None when nothing says."""
    if job.status == RUNNING and progress and isinstance(progress.get("eta_s"), (int, float)):
        return float(progress["eta_s"])
    pace = paces.get(job.model)
    if pace is None:
        return None
    whole = pace.seconds_per_block * _blocks(job, pace)
    if job.status == RUNNING and job.started_at is not None:
        return max(0.0, whole - (now - job.started_at.timestamp()))
    return whole


def _workers_per_queue(r: redis.Redis, queues: set[str]) -> dict[str, int]:
    try:
        workers = live_workers(r)
    except redis.RedisError:
        return {}
    return {q: sum(consumed(q, [w]) for w in workers) for q in queues}


def standings(session: Session, r: redis.Redis, default_queue: str, progress_of: Any) -> dict[int, Standing]:
    """Each queued job's standing, by id. ``progress_of(job)``: a running job's live progress."""
    active = list(
        session.scalars(
            select(Job)
            .where(Job.status.in_([QUEUED, RUNNING]))
            .order_by(func.coalesce(Job.enqueued_at, Job.created_at), Job.id)
            .limit(MAX_QUEUED)
        )
    )
    if not any(job.status == QUEUED for job in active):
        return {}
    paces, now = history(session), time.time()
    queue_of = {job.id: job.queue or default_queue for job in active}
    workers = _workers_per_queue(r, set(queue_of.values()))
    by_queue: dict[str, list[Job]] = {}
    for job in active:
        by_queue.setdefault(queue_of[job.id], []).append(job)
    out: dict[int, Standing] = {}
    for queue, jobs_ in by_queue.items():
        waiting = [job for job in jobs_ if job.status == QUEUED]
        ahead: list[float | None] = [
            _seconds_left(job, paces, progress_of(job), now) for job in jobs_ if job.status == RUNNING
        ]
        takers = workers.get(queue, 1)  # (the workers unreadable: one, as a guess)
        for position, job in enumerate(waiting, 1):
            known = takers > 0 and all(s is not None for s in ahead)  # no worker takes the queue: unknown
            start = sum(s or 0.0 for s in ahead) / takers if known else None
            out[job.id] = Standing(queue, position, len(waiting), start)
            ahead.append(_seconds_left(job, paces, None, now))
    return out
