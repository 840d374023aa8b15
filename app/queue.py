"""Enqueueing jobs by task NAME: the API never imports the worker (nor torch)."""

from __future__ import annotations

import threading
import uuid

from celery import Celery

from app.config import Settings

RUN_JOB_TASK = "sparsegpt.run_job"
# Message priorities (kombu's Redis transport: one list per step of 0, 3, 6, 9; a worker pops the
# lowest number first, and a message without one counts as 0). A "low" plan's jobs are sent with 9:
# they start after every ordinary job waiting in the same queue (tests/api/test_plans.py checks the
# order against a real worker). None: the message carries no priority (every ordinary job).
PRIORITIES: dict[str, int | None] = {"normal": None, "low": 9}

_clients: dict[tuple[str, int], Celery] = {}
_lock = threading.Lock()


def broker_options(settings: Settings) -> dict:
    """Transport options shared by the API's producer and the workers: Redis redelivers an
    unacknowledged message after the visibility timeout, so it must exceed the longest job."""
    return {"visibility_timeout": settings.visibility_timeout_s}


def client(settings: Settings) -> Celery:
    key = (settings.redis, settings.visibility_timeout_s)
    with _lock:
        app = _clients.get(key)
        if app is None:
            app = Celery("sparsegpt-api", broker=settings.redis, set_as_current=False)
            # A hung Redis fails a send within seconds (the client's default waits forever),
            # well before anyone could take the job's Idempotency-Key for a lost request.
            app.conf.broker_transport_options = {
                **broker_options(settings),
                "socket_timeout": 5.0,
                "socket_connect_timeout": 5.0,
            }
            app.conf.broker_connection_retry_on_startup = True
            app.conf.task_ignore_result = True
            _clients[key] = app
        return app


def enqueue_job(
    settings: Settings,
    job_id: int,
    *,
    queue: str | None = None,
    task_id: str | None = None,
    priority: int | None = None,
) -> str:
    """Send the run message for a committed job row (with the job's ``priority``, None: none);
    returns the Celery task id."""
    task_id = task_id or f"job-{job_id}-{uuid.uuid4().hex[:12]}"
    options = {} if priority is None else {"priority": priority}
    client(settings).send_task(
        RUN_JOB_TASK,
        args=[job_id],
        task_id=task_id,
        queue=queue or settings.queue,
        **options,
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2},
    )
    return task_id
