"""The workers seen recently: each refreshes a Redis key with a TTL (worker/celery_app.py) holding
its name, queues, pid and hardware (worker/gpus.py); the jobs they run come from the database."""

from __future__ import annotations

import json
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import streams
from app.models import RUNNING, Job


def live_workers(r: redis.Redis) -> list[dict[str, Any]]:
    """Every registration key alive now, with ``seen_s_ago`` (Redis's clock on both sides: the
    worker stamps ``seen`` with it, worker/celery_app.py) and ``clock_skew_s`` (the worker's clock
    minus Redis's); sorted by name. Raises RedisError."""
    keys = list(r.scan_iter(match=streams.WORKER_PATTERN, count=500))
    seconds, micros = r.time()
    now = seconds + micros / 1e6
    found = []
    for raw in r.mget(keys) if keys else []:
        if not raw:
            continue
        try:
            info = json.loads(raw)
        except ValueError:
            continue
        info["seen_s_ago"] = round(max(0.0, now - float(info.get("seen", now))), 1)
        found.append(info)
    return sorted(found, key=lambda w: str(w.get("name", "")))


def running_jobs_by_worker(session: Session) -> dict[str, list[int]]:
    """{worker name: [ids of the jobs it runs]}, from the job rows."""
    rows = session.execute(select(Job.worker, Job.id).where(Job.status == RUNNING).order_by(Job.id))
    found: dict[str, list[int]] = {}
    for worker, job_id in rows:
        found.setdefault(worker or "", []).append(job_id)
    return found
