"""Celery, set for hours-long GPU jobs, one at a time per worker.

- acks late + reject on worker lost: a job whose process dies is delivered again;
- prefetch 1: a worker holds no second job while it runs one;
- the visibility timeout (broker and result backend) above the longest job: Redis would
  otherwise hand a still-running job to another worker;
- prefork pool of one process, one task per child: time limits and remote control work, and
  every job starts in a fresh process (CUDA memory goes back to the driver when it ends);
- torch and CUDA are touched only inside the task (worker.tasks imports them lazily).

Start it with ``sparsegpt worker [--gpu N] [--queue Q]`` (or ``celery -A worker.celery_app worker``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from celery import Celery, signals

from app import db, streams
from app.config import get_settings
from app.queue import broker_options

log = logging.getLogger(__name__)
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def make_celery() -> Celery:
    settings = get_settings()
    url = settings.redis_url or DEFAULT_REDIS
    app = Celery("sparsegpt", broker=url, backend=url, include=["worker.tasks"])
    options = broker_options(settings)
    app.conf.update(
        broker_transport_options=options,
        result_backend_transport_options=options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # ride out a Redis restart
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_track_started=False,
        task_time_limit=settings.job_time_limit_s + 600,
        task_soft_time_limit=settings.job_time_limit_s,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,
        worker_pool="prefork",
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
    )
    return app


celery_app = make_celery()


# --- "workers seen recently": each worker refreshes a key with a TTL -------------------------

class _Registration:
    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.key: str | None = None


_registration = _Registration()


@signals.worker_ready.connect
def _register(sender=None, **_kwargs) -> None:
    import redis

    settings = get_settings()
    name = getattr(sender, "hostname", None) or f"sparsegpt@{socket.gethostname()}"
    try:
        queues = sorted(sender.app.amqp.queues.consume_from.keys())
    except AttributeError:
        queues = [settings.queue]
    client = redis.Redis.from_url(settings.redis_url or DEFAULT_REDIS)
    key = _registration.key = streams.worker_key(name)
    ttl = settings.worker_seen_ttl_s
    info = {"name": name, "queues": queues, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}

    def beat() -> None:
        while not _registration.stop.is_set():
            try:
                client.set(key, json.dumps({**info, "seen": time.time()}), ex=ttl)
            except Exception as err:  # Redis restarting: try again next beat
                log.debug("worker registration failed: %s", err)
            _registration.stop.wait(max(1.0, ttl / 3))

    _registration.thread = threading.Thread(target=beat, name="sparsegpt-registration", daemon=True)
    _registration.thread.start()


@signals.worker_shutdown.connect
def _unregister(**_kwargs) -> None:
    import redis

    _registration.stop.set()
    if _registration.key:
        try:
            redis.Redis.from_url(get_settings().redis_url or DEFAULT_REDIS).delete(_registration.key)
        except Exception:
            pass


@signals.worker_process_init.connect
def _after_fork(**_kwargs) -> None:
    """Pool child: never reuse database connections inherited from the parent."""
    db.dispose_all()


def run_worker(
    *,
    queues: list[str] | None = None,
    gpu: int | None = None,
    loglevel: str = "info",
    hostname: str | None = None,
    concurrency: int = 1,
) -> int:
    """``sparsegpt worker``: consume the shared queue (plus per-GPU ones) in a prefork pool."""
    settings = get_settings()
    names = [settings.queue]
    for q in queues or []:
        names += [n.strip() for n in q.split(",") if n.strip() and n.strip() not in names]
    if hostname is None:
        hostname = f"sparsegpt-gpu{gpu}@%h" if gpu is not None else "sparsegpt@%h"
    argv = [
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        "--max-tasks-per-child=1",
        "--prefetch-multiplier=1",
        f"--queues={','.join(names)}",
        f"--hostname={hostname}",
        f"--loglevel={loglevel}",
        "--without-mingle",
        "--without-gossip",
    ]
    celery_app.worker_main(argv)
    return 0
