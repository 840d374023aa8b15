"""The thin task: claim the job row, run the engine with a Redis progress reporter and a
cancellation check, record results, metrics and the artifact (or a reason a person can act on).

What the job runs on is checked and resolved in ``worker.job_inputs``, the heartbeat and the
cancel checks live in ``worker.liveness``, failure reasons are worded in ``worker.failures``,
the job's memory (its estimate, the soft limit, an OOM kill) in ``worker.memory``.
Nothing here imports torch at module level: the engine is imported inside the task, in the
pool's child process, so the worker's main process never touches CUDA.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis
from celery.exceptions import WorkerLostError
from celery.worker.request import Request
from redis.backoff import NoBackoff
from redis.retry import Retry

from app import crud, db, packagers, storage
from app.config import Settings, get_settings
from app.job_files import JobFiles
from app.models import CANCELLED, FAILED, RUNNING, SUCCEEDED
from app.queue import RUN_JOB_TASK
from worker import checkpoint_sync, published
from worker.celery_app import celery_app
from worker.engine.contract.report import Report
from worker.failures import describe_failure, is_cancel, is_expected, late_cancel
from worker.job_inputs import job_inputs
from worker.liveness import Liveness
from worker.memory import (
    MemoryWatch,
    OomCounters,
    check_loaded_model,
    oom_counters,
    oom_evidence,
    oom_reason,
    read_sample,
)
from worker.reporter import RedisProgress

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_is_dead(worker: str | None, pid: int | None) -> bool:
    """A running job's claimer is known dead when it ran on this host and its pid is gone
    (a pool child killed mid-job, then the message redelivered here at once)."""
    if not worker or not pid or pid == os.getpid():
        return False
    host = worker.rpartition("@")[2]
    return host == socket.gethostname() and not _pid_alive(pid)


class JobRequest(Request):
    """The worker's main process's side of one delivery. A pool process killed mid-job (SIGKILL)
    is redelivered (acks_late, reject_on_worker_lost): a person's kill -9 or a lost machine is
    worth another attempt, but the kernel's OOM killer would only kill it again. So the OOM
    counters are read when the job starts and when its process is lost; an OOM kill fails the
    job with that reason (the redelivered message then finds it finished and does nothing)."""

    def on_accepted(self, pid, time_accepted):
        self.oom_before = oom_counters()
        super().on_accepted(pid, time_accepted)

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # ExceptionWithTraceback
        # Only a SIGKILL is the OOM killer's doing (a segfault or another exit is retried as any
        # lost attempt).
        killed = isinstance(exc, SystemExit) or (isinstance(exc, WorkerLostError) and "signal 9" in str(exc))
        if killed and self.args:
            try:
                fail_if_oom_killed(int(self.args[0]), self.worker_pid, getattr(self, "oom_before", None))
            except Exception:  # the database down: the attempt is retried as any lost one
                log.exception("job %s: could not check whether its process was OOM-killed", self.args[0])
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


_oom_seen: int | None = None  # the cgroup's OOM-kill count when a lost process was last checked


def fail_if_oom_killed(job_id: int, pid: int | None, before: OomCounters | None) -> bool:
    """In the worker's main process, once the pool process ``pid`` running the job is gone."""
    global _oom_seen
    settings = get_settings()
    client = redis.Redis.from_url(
        settings.redis_url or "redis://127.0.0.1:6379/0",
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=2,
    )
    try:
        sample = read_sample(client, job_id)
        if sample is not None and pid is not None and sample.get("pid") != pid:
            sample = None  # an older attempt's
        after = oom_counters()
        if before is not None and before.cgroup is not None and _oom_seen is not None:
            before = replace(before, cgroup=max(before.cgroup, _oom_seen))
        evidence = oom_evidence(before, after, sample)
        _oom_seen = after.cgroup  # one OOM kill explains one lost process, not a later one's too
        if evidence is None:
            return False
        reason = oom_reason(sample)
        with db.session_scope(settings.database) as session:
            job = crud.get_job(session, job_id)
            if job is None or job.status != RUNNING or (pid is not None and job.worker_pid != pid):
                return False
            attempt = job.attempt
            if not crud.finish_job(session, job_id=job_id, attempt=attempt, status=FAILED, error=reason):
                return False
        log.error("job %s failed: %s (%s)", job_id, reason, evidence)
        RedisProgress(client, job_id, attempt, maxlen=settings.events_maxlen, ttl_s=settings.events_ttl_s).status(
            FAILED, final=True, error=reason
        )
    finally:
        client.close()
    JobFiles(settings, job_id).remove_partials()
    return True


@celery_app.task(
    name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True, Request=JobRequest
)
def run_job_task(self, job_id: int) -> dict[str, Any]:
    hostname = self.request.hostname or f"sparsegpt@{socket.gethostname()}"
    return JobRun(get_settings(), int(job_id), worker=hostname).run()


class JobRun:
    """One delivery of a job's message: claim, run, record."""

    def __init__(self, settings: Settings, job_id: int, *, worker: str):
        self.settings, self.job_id, self.worker = settings, job_id, worker
        self.files = JobFiles(settings, job_id)  # its paths and keys (app/job_files.py)
        self.url = settings.database
        # Short timeouts: while Redis is down or restarting, progress is dropped, the job runs on.
        self.redis = redis.Redis.from_url(
            settings.redis_url or "redis://127.0.0.1:6379/0",
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=2,
            health_check_interval=10,
            retry=Retry(NoBackoff(), 1),
        )
        self.attempt = 0
        self.reporter: RedisProgress | None = None
        self.liveness: Liveness | None = None

    # --- the steps -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        with db.session_scope(self.url) as session:
            claim = crud.claim_job(
                session,
                job_id=self.job_id,
                worker=self.worker,
                pid=os.getpid(),
                stale_before=crud.stale_before(self.settings.heartbeat_timeout_s, session),
                max_attempts=self.settings.max_attempts,
                owner_is_dead=owner_is_dead,
            )
            spec = dict(claim.job.spec) if claim.job is not None else None
        if not claim.claimed:
            log.info("job %s not run: %s", self.job_id, claim.reason)
            if claim.reason.startswith("gave up"):
                self._reporter(claim.job.attempt).status(FAILED, final=True, error=claim.reason)
                self.files.remove_partials()  # what the killed attempts left
            return {"job": self.job_id, "skipped": claim.reason}
        self.attempt = claim.job.attempt
        reporter = self._reporter(self.attempt)
        reporter.status("running", worker=self.worker)
        partial = self.partial = self.files.partial(self.attempt)
        watch = MemoryWatch(
            self.redis,
            self.job_id,
            self.attempt,
            on_over_limit=self._over_memory_limit,
            max_rss_bytes=int(self.settings.worker_max_rss_gb * 1e9),
        )
        self.liveness = Liveness(
            self.url, self.job_id, self.attempt, reporter, interval_s=self.settings.heartbeat_interval_s, watch=watch
        )
        try:
            with self.liveness:  # the heartbeat beats until the attempt is recorded
                return self._execute(spec, partial)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
            reporter.clear_cancel_flag()

    def _execute(self, stored: dict[str, Any], partial: Path) -> dict[str, Any]:
        should_cancel = self.liveness.should_cancel
        try:
            inputs = job_inputs(stored, self.settings)
            shutil.rmtree(partial, ignore_errors=True)
            partial.parent.mkdir(parents=True, exist_ok=True)
            # torch is imported here, in the pool's child, only once the job is accepted
            from worker.engine.pipeline import RunOptions, run

            options = RunOptions(
                device=self.settings.worker_device,
                output=str(partial),
                token=os.environ.get("HF_TOKEN") or None,
                task_dirs=self.settings.eval_task_dirs,
                resume_dir=str(self.files.resume),  # a redelivery resumes there
                formats=packagers.engine_formats(stored),  # quantizing: a directory per format
                # the report and card name what the user named, not the server's paths
                labels=published.labels(
                    inputs, stored, output=partial, name=self.files.name, task_dirs=tuple(self.settings.eval_task_dirs)
                ),
            )
            # The checkpoints follow the job through its store to whichever machine runs it next.
            sync = checkpoint_sync.for_job(self.settings, self.files)
            try:
                sync.pull()
            except storage.StorageError as err:  # no checkpoint then: the blocks run again
                log.warning("job %s: checkpoint not fetched: %s", self.job_id, err)
            sync.start()
            try:
                report = run(
                    inputs.spec,
                    options,
                    on_progress=self.reporter.progress,
                    should_cancel=should_cancel,
                    on_loaded=lambda facts: check_loaded_model(facts, inputs.spec, self.settings.max_job_memory_gb),
                )
            finally:
                sync.stop()
            if should_cancel():
                raise late_cancel()
        except BaseException as exc:  # every way out is recorded
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return self._record_failure(exc, stored)
        return self._record_success(report, partial, stored)

    def _record_success(self, report: Report, partial: Path, stored: dict[str, Any]) -> dict[str, Any]:
        final = self.files.attempt(self.attempt)
        shutil.rmtree(final, ignore_errors=True)
        artifacts: list[dict[str, Any]] = []
        if partial.is_dir():
            os.replace(partial, final)
            try:  # every format of the job (app/packagers.py), kept by the store
                artifacts = self.files.publish(final, packagers.for_job(stored))
            except storage.StorageError as err:  # the store unreachable or refusing: the job fails with why
                shutil.rmtree(final, ignore_errors=True)
                return self._record_failure(err, stored)
        metrics = metric_rows(report)
        with db.session_scope(self.url) as session:
            done = crud.finish_job(
                session,
                job_id=self.job_id,
                attempt=self.attempt,
                status=SUCCEEDED,
                result=report.to_json(),  # the whole report (JSON-safe: no NaN)
                progress=self.reporter.snapshot(),
                modules=module_rows(report),
                metrics=metrics,
                artifacts=artifacts,
            )
        if not done:
            log.warning("job %s attempt %s finished but no longer owns the job", self.job_id, self.attempt)
            self.files.discard(artifacts)
            shutil.rmtree(final, ignore_errors=True)
            return {"job": self.job_id, "lost": True}
        self.files.keep_only(artifacts)  # earlier attempts' leftovers, a copy a remote store holds, checkpoints
        self.reporter.status(
            SUCCEEDED,
            final=True,
            artifact={"size": artifacts[0]["size"], "sha256": artifacts[0]["sha256"]} if artifacts else None,
            perplexity={m["dataset"]: m["perplexity"] for m in metrics},
        )
        return {"job": self.job_id, "status": SUCCEEDED}

    def _record_failure(self, exc: BaseException, stored: dict[str, Any]) -> dict[str, Any]:
        if self.liveness.lost.is_set():
            log.warning("job %s attempt %s stopped: another attempt owns the job", self.job_id, self.attempt)
            return {"job": self.job_id, "lost": True}
        if is_cancel(exc):
            status, reason = CANCELLED, "cancelled while running"
        else:
            status, reason = FAILED, describe_failure(exc, stored, self.settings)
            log.error("job %s failed: %s", self.job_id, reason, exc_info=not is_expected(exc))
        with db.session_scope(self.url) as session:
            crud.finish_job(
                session,
                job_id=self.job_id,
                attempt=self.attempt,
                status=status,
                error=reason,
                progress=self.reporter.snapshot(),
            )
        self.files.drop_checkpoints()  # the job ended: no attempt resumes
        self.reporter.status(status, final=True, error=reason)
        return {"job": self.job_id, "status": status, "error": reason}

    def _over_memory_limit(self, reason: str) -> None:
        """The heartbeat thread's memory guard tripped: the job is failed, then this process is
        ended at once (its memory is what is wrong; the pool starts another)."""
        with db.session_scope(self.url) as session:
            done = crud.finish_job(
                session,
                job_id=self.job_id,
                attempt=self.attempt,
                status=FAILED,
                error=reason,
                progress=self.reporter.snapshot(),
            )
        if not done:  # finished or taken over meanwhile: nothing to stop
            return
        log.error("job %s failed: %s", self.job_id, reason)
        self.reporter.status(FAILED, final=True, error=reason)
        shutil.rmtree(self.partial, ignore_errors=True)
        self.files.drop_checkpoints()
        os.kill(os.getpid(), signal.SIGKILL)

    # --- helpers ------------------------------------------------------------------------------

    def _reporter(self, attempt: int) -> RedisProgress:
        self.reporter = RedisProgress(
            self.redis, self.job_id, attempt, maxlen=self.settings.events_maxlen, ttl_s=self.settings.events_ttl_s
        )
        return self.reporter


# --- the report as database rows -----------------------------------------------------------------


def module_rows(report: Report) -> list[dict[str, Any]]:
    """One row per pruned module: its block, achieved sparsity, reconstruction error, seconds."""
    return [
        {
            "block": -1 if layer.block is None else layer.block,
            "name": str(layer.name),
            "sparsity": _float(layer.sparsity) or 0.0,
            "error": _float(layer.error),
            "seconds": _float(layer.seconds),
        }
        for layer in report.layers
    ]


def metric_rows(report: Report) -> list[dict[str, Any]]:
    """One row per evaluation set (the report names it as the user did): dense and pruned perplexity."""
    dense, pruned = report.dense_perplexity, report.perplexity
    return [
        {"dataset": name, "dense_perplexity": _float(dense.get(name)), "perplexity": _float(pruned.get(name))}
        for name in dict.fromkeys([*pruned, *dense])
    ]


def _float(value: Any) -> float | None:
    """A finite float, else None (the database and browsers take no NaN)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None
