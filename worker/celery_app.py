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
import shutil
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

from celery import Celery, signals

from app import db, streams
from app.config import get_settings
from app.queue import broker_options
from worker import local_files

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
    info = {
        "name": name,
        "queues": queues,
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
        **_hardware(settings),
    }

    def beat() -> None:
        clean_at = 0.0  # at start, then every local_files.INTERVAL_S
        while not _registration.stop.is_set():
            try:
                client.set(key, json.dumps(registration_record(client, info)), ex=ttl)
            except Exception as err:  # Redis restarting: try again next beat
                log.debug("worker registration failed: %s", err)
            if time.monotonic() >= clean_at:
                clean_at = time.monotonic() + local_files.INTERVAL_S
                try:  # what attempts lost on this machine left (their jobs run or ended elsewhere)
                    local_files.remove_leftovers(settings)
                except Exception as err:  # the database restarting: next time
                    log.warning("leftovers of lost attempts not removed: %s", err)
            _registration.stop.wait(max(1.0, ttl / 3))

    _registration.thread = threading.Thread(target=beat, name="sparsegpt-registration", daemon=True)
    _registration.thread.start()


def registration_record(client, info: dict) -> dict:
    """``info`` stamped with Redis's clock (``seen``: what the Workers page compares with the same
    clock) and this machine's offset from it (``clock_skew_s``, + ahead, - behind), shown there."""
    seconds, micros = client.time()
    server = seconds + micros / 1e6
    return {**info, "seen": server, "clock_skew_s": round(time.time() - server, 1)}


def _hardware(settings) -> dict:
    """What this worker advertises (worker.gpus): read once per process."""
    global _described
    if _described is None:
        from worker.gpus import describe

        _described = describe(
            advertised_gb=settings.worker_gpu_memory_gb,
            advertised_name=settings.worker_gpu_name,
            device=settings.worker_device,
        )
    return _described


_described: dict | None = None


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
    """Pool child: never reuse database connections inherited from the parent; run the job
    from the neutral directory."""
    db.dispose_all()
    if _neutral.path is not None:
        os.chdir(_neutral.path)


# --- the neutral working directory -------------------------------------------------------------
# transformers' from_pretrained("org/name") and datasets' load_dataset("org/name") look for a
# directory of that name relative to the working directory before they ask the Hub: a worker
# started in a directory holding "outside/secretmodel" would load it from disk. The worker (its
# main process once it is up, each pool process before it runs a job) therefore works in
# <data_dir>/worker-cwd, emptied when the worker starts; nothing is ever written there.

WORKER_CWD = "worker-cwd"
_CACHE_VARIABLES = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_DATASETS_CACHE",
    "TRANSFORMERS_CACHE",
    "TORCH_HOME",
    "XDG_CACHE_HOME",
)


class _Neutral:
    path: Path | None = None


_neutral = _Neutral()


def prepare_neutral_cwd(settings=None) -> Path:
    """Create (or empty) <data_dir>/worker-cwd and make every relative path this process will
    use absolute first (settings, cache variables, sys.path), so leaving the start directory
    changes nothing else. Returns the directory; ``os.chdir`` into it is the caller's."""
    settings = settings or get_settings()
    # Relative settings would be resolved against the new directory: pin them to the start one.
    settings.local_dirs = ":".join(str(p) for p in settings.allowed_dirs)
    os.environ["SPARSEGPT_LOCAL_DIRS"] = settings.local_dirs
    if settings.database_url:
        settings.database_url = os.environ["DATABASE_URL"] = _absolute_sqlite(settings.database_url)
    for name in _CACHE_VARIABLES:
        if os.environ.get(name) and not os.path.isabs(os.environ[name]):
            os.environ[name] = os.path.abspath(os.environ[name])
    sys.path[:] = [os.path.abspath(p) if not os.path.isabs(p) else p for p in sys.path]
    path = settings.data_dir / WORKER_CWD
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        # Emptying a link's target would delete whatever it points at: the link goes instead.
        log.warning("%s is not a directory of its own; replacing it with an empty one", path)
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():  # left by hand, or by an older version: a job could name it
        log.warning("removing %s from the worker's working directory", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    _neutral.path = path
    return path


def _absolute_sqlite(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    name = parsed.database
    if not parsed.drivername.startswith("sqlite") or not name or name == ":memory:" or name.startswith("file:"):
        return url
    return (
        url if os.path.isabs(name) else parsed.set(database=os.path.abspath(name)).render_as_string(hide_password=False)
    )


@signals.worker_init.connect
def _prepare_neutral_cwd(**_kwargs) -> None:
    """Before the pool starts (its processes chdir in ``_after_fork``)."""
    prepare_neutral_cwd()


@signals.worker_ready.connect
def _enter_neutral_cwd(**_kwargs) -> None:
    """The main process too, once its log and pid files are open (relative ones stay where
    they were asked for)."""
    if _neutral.path is not None:
        os.chdir(_neutral.path)


def run_worker(
    *,
    queues: list[str] | None = None,
    gpu: int | None = None,
    loglevel: str = "info",
    hostname: str | None = None,
    concurrency: int = 1,
) -> int:
    """``sparsegpt worker``: consume the shared queue (plus per-GPU ones) in a prefork pool."""
    from worker.gpus import queues_for

    settings = get_settings()
    names = [settings.queue]
    for q in queues or []:
        names += [n.strip() for n in q.split(",") if n.strip() and n.strip() not in names]
    # The per-memory queues it fits (app/services/routing.py sends a job to the one it needs).
    names += [n for n in queues_for(settings.queue, _hardware(settings)["memory_gb"]) if n not in names]
    if hostname is None:
        hostname = f"sparsegpt-gpu{gpu}@%h" if gpu is not None else "sparsegpt@%h"
    # Celery's "superuser privileges" warning is about pickle, which this app never accepts (JSON
    # only); in a container the worker runs as root.
    warnings.filterwarnings("ignore", message="You're running the worker with superuser privileges")
    argv = [
        "--quiet",  # no banner
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
