"""The thin task: claim the job row, run the engine with a Redis progress reporter and a
cancellation check, record results, metrics and the artifact (or a reason a person can act on).

Nothing here imports torch at module level: the engine is imported inside the task, in the
pool's child process, so the worker's main process never touches CUDA.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded

from app import archive, crud, db
from app.config import Settings, get_settings
from app.models import CANCELLED, FAILED, SUCCEEDED
from app.paths import PathNotAllowed, resolve_allowed
from app.queue import RUN_JOB_TASK
from app.schemas import BUILTIN_DATASETS, upload_id
from worker.celery_app import celery_app
from worker.progress import RedisProgress

log = logging.getLogger(__name__)


class Refused(Exception):
    """The job cannot run as stored (a path left the allowed directories, an upload vanished)."""


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


@celery_app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job_task(self, job_id: int) -> dict[str, Any]:
    hostname = self.request.hostname or f"sparsegpt@{socket.gethostname()}"
    return JobRun(get_settings(), int(job_id), worker=hostname).run()


class JobRun:
    def __init__(self, settings: Settings, job_id: int, *, worker: str):
        self.settings, self.job_id, self.worker = settings, job_id, worker
        self.url = settings.database
        # Short timeouts: while Redis is down or restarting, progress is dropped, the job runs on.
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.redis = redis.Redis.from_url(
            settings.redis_url or "redis://127.0.0.1:6379/0", decode_responses=True,
            socket_timeout=5, socket_connect_timeout=2, health_check_interval=10, retry=Retry(NoBackoff(), 1),
        )
        self.attempt = 0
        self.cancel = threading.Event()  # set by the heartbeat (database flag) or the Redis flag
        self.lost = threading.Event()  # another attempt owns the job now: stop quietly
        self._stop_heartbeat = threading.Event()
        self._last_flag_check = 0.0
        self.reporter: RedisProgress | None = None

    # --- the steps -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        with db.session_scope(self.url) as session:
            claim = crud.claim_job(
                session,
                job_id=self.job_id,
                worker=self.worker,
                pid=os.getpid(),
                stale_before=crud.stale_before(self.settings.heartbeat_timeout_s),
                max_attempts=self.settings.max_attempts,
                owner_is_dead=owner_is_dead,
            )
            spec = dict(claim.job.spec) if claim.job is not None else None
        if not claim.claimed:
            log.info("job %s not run: %s", self.job_id, claim.reason)
            if claim.reason.startswith("gave up"):
                self._reporter(claim.job.attempt).status(FAILED, final=True, error=claim.reason)
                remove_partials(self._job_dir())  # what the killed attempts left
            return {"job": self.job_id, "skipped": claim.reason}
        self.attempt = claim.job.attempt
        reporter = self._reporter(self.attempt)
        reporter.status("running", worker=self.worker)
        heartbeat = threading.Thread(target=self._heartbeat, name=f"heartbeat-{self.job_id}", daemon=True)
        heartbeat.start()
        partial = self._job_dir() / f"attempt-{self.attempt}.partial"
        try:
            return self._execute(spec, partial)
        finally:
            self._stop_heartbeat.set()
            heartbeat.join(timeout=5)
            shutil.rmtree(partial, ignore_errors=True)
            reporter.clear_cancel_flag()

    def _execute(self, spec: dict[str, Any], partial: Path) -> dict[str, Any]:
        try:
            job, labels = self._prune_job(spec, partial)
            from worker.engine.pipeline import run_job  # torch is imported here, in the child

            report = run_job(job, on_progress=self.reporter.progress, should_cancel=self.should_cancel)
            if self.should_cancel():
                raise _late_cancel()
        except BaseException as exc:  # noqa: BLE001 - every way out is recorded
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return self._record_failure(exc, spec)
        return self._record_success(report, labels, partial)

    def _record_success(self, report: dict[str, Any], labels: dict[str, str], partial: Path) -> dict[str, Any]:
        final = self._job_dir() / f"attempt-{self.attempt}"
        shutil.rmtree(final, ignore_errors=True)
        artifact = None
        if partial.is_dir():
            os.replace(partial, final)
            size, sha = archive.digest(final, archive.artifact_name(self.job_id))
            artifact = (str(final), size, sha)
        modules = [
            {
                "block": int(layer.get("block", -1)),
                "name": str(layer["name"]),
                "sparsity": float(layer.get("sparsity", 0.0)),
                "error": _float(layer.get("error")),
                "seconds": _float(layer.get("seconds")),
            }
            for layer in report.get("layers", [])
        ]
        dense = report.get("dense_perplexity") or {}
        pruned = report.get("perplexity") or {}
        metrics = [
            {"dataset": _label(name, labels), "dense_perplexity": _float(dense.get(name)), "perplexity": _float(pruned.get(name))}
            for name in dict.fromkeys([*pruned, *dense])
        ]
        result = {
            key: report.get(key)
            for key in ("model", "method", "pattern", "sparsity", "seconds", "peak_memory_bytes", "environment")
        }
        with db.session_scope(self.url) as session:
            done = crud.finish_job(
                session, job_id=self.job_id, attempt=self.attempt, status=SUCCEEDED, result=_jsonable(result),
                progress=self.reporter.snapshot(), modules=modules, metrics=metrics, artifact=artifact,
            )
        if not done:
            log.warning("job %s attempt %s finished but no longer owns the job", self.job_id, self.attempt)
            shutil.rmtree(final, ignore_errors=True)
            return {"job": self.job_id, "lost": True}
        for other in self._job_dir().glob("attempt-*"):  # earlier attempts' leftovers
            if other != final:
                shutil.rmtree(other, ignore_errors=True)
        self.reporter.status(
            SUCCEEDED, final=True,
            artifact={"size": artifact[1], "sha256": artifact[2]} if artifact else None,
            perplexity={m["dataset"]: m["perplexity"] for m in metrics},
        )
        return {"job": self.job_id, "status": SUCCEEDED}

    def _record_failure(self, exc: BaseException, spec: dict[str, Any]) -> dict[str, Any]:
        cancelled = _is_cancel(exc)
        if self.lost.is_set():
            log.warning("job %s attempt %s stopped: another attempt owns the job", self.job_id, self.attempt)
            return {"job": self.job_id, "lost": True}
        if cancelled:
            status, reason = CANCELLED, "cancelled while running"
        else:
            status, reason = FAILED, describe_failure(exc, spec, self.settings)
            log.error("job %s failed: %s", self.job_id, reason, exc_info=not _expected(exc))
        with db.session_scope(self.url) as session:
            crud.finish_job(
                session, job_id=self.job_id, attempt=self.attempt, status=status, error=reason,
                progress=self.reporter.snapshot(),
            )
        self.reporter.status(status, final=True, error=reason)
        return {"job": self.job_id, "status": status, "error": reason}

    # --- callbacks ----------------------------------------------------------------------------

    def should_cancel(self) -> bool:
        """Polled by the engine between modules and blocks."""
        if self.cancel.is_set() or self.lost.is_set():
            return True
        now = time.monotonic()
        if now - self._last_flag_check >= 0.2:
            self._last_flag_check = now
            if self.reporter.cancel_flag():
                self.cancel.set()
        return self.cancel.is_set()

    def _heartbeat(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while not self._stop_heartbeat.wait(interval):
            try:
                with db.session_scope(self.url) as session:
                    ours, cancel = crud.heartbeat(
                        session, job_id=self.job_id, attempt=self.attempt, progress=self.reporter.snapshot()
                    )
            except Exception as err:  # the database restarting: try again next beat
                log.warning("job %s: heartbeat failed: %s", self.job_id, err)
                continue
            if cancel:
                self.cancel.set()
            if not ours:
                self.lost.set()
                return

    # --- helpers ------------------------------------------------------------------------------

    def _reporter(self, attempt: int) -> RedisProgress:
        self.reporter = RedisProgress(
            self.redis, self.job_id, attempt, maxlen=self.settings.events_maxlen, ttl_s=self.settings.events_ttl_s
        )
        return self.reporter

    def _job_dir(self) -> Path:
        return self.settings.artifacts_dir / str(self.job_id)

    def _dataset(self, value: str, labels: dict[str, str]) -> str:
        if value in BUILTIN_DATASETS:
            return value
        set_id = upload_id(value)
        if set_id is not None:
            with db.session_scope(self.url) as session:
                row = crud.get_calibration_set(session, set_id)
                path = row.path if row is not None else None
            if path is None or not Path(path).is_file():
                raise Refused(f"calibration set {value} no longer exists on the server; upload it again")
            labels[path] = value
            return path
        try:  # resolved again: a symlink may have changed since the job was queued
            path = str(resolve_allowed(value, self.settings.allowed_dirs, kind="file"))
        except PathNotAllowed as err:
            raise Refused(str(err)) from None
        labels[path] = value
        return path

    def _prune_job(self, spec: dict[str, Any], partial: Path):
        from worker.engine.pipeline import PruneJob

        check_free_disk(self.settings)
        if spec.get("trust_remote_code") and not self.settings.allow_trust_remote_code:
            raise Refused("trust_remote_code is refused by this server's settings")
        model = spec["model"]
        if model.startswith("/"):
            try:
                model = str(resolve_allowed(model, self.settings.allowed_dirs, kind="dir"))
            except PathNotAllowed as err:
                raise Refused(str(err)) from None
        labels: dict[str, str] = {}
        cal, ev, solver = spec["calibration"], spec["evaluation"], spec["solver"]
        calibration = self._dataset(cal["dataset"], labels)
        eval_sets = [self._dataset(name, labels) for name in ev["datasets"]]
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        job = PruneJob(
            model=model,
            sparsity=spec["sparsity"],
            method=spec["method"],
            revision=spec.get("revision"),
            trust_remote_code=bool(spec.get("trust_remote_code")),
            token=os.environ.get("HF_TOKEN") or None,
            calibration=calibration,
            nsamples=cal["nsamples"],
            seqlen=cal.get("seqlen"),
            seed=cal.get("seed", 0),
            blocksize=solver["blocksize"],
            percdamp=solver["percdamp"],
            wbits=solver.get("wbits"),
            exact=bool(solver.get("exact", False)),
            eval_sets=eval_sets,
            eval_windows=ev.get("max_windows"),
            eval_dense=ev.get("dense", True),
            device=self.settings.worker_device,
            dtype=spec.get("dtype", "auto"),
            output=str(partial),
        )
        return job, labels


def remove_partials(job_dir: Path) -> None:
    """Unfinished outputs of attempts whose process was killed (no ``finally`` ran for them)."""
    for partial in job_dir.glob("attempt-*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    try:
        job_dir.rmdir()  # only if nothing else is there
    except OSError:
        pass


def check_free_disk(settings: Settings) -> None:
    """Refuse to start when the data directory's disk has less free space than the setting."""
    minimum = settings.min_free_disk_mb * 1024 * 1024
    if minimum <= 0:
        return
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.data_dir).free
    if free < minimum:
        raise Refused(
            f"not started: the server's data directory ({settings.data_dir}) has {free / 2**30:.2f} GiB free, "
            f"below the {minimum / 2**30:.2f} GiB minimum (SPARSEGPT_MIN_FREE_DISK_MB); "
            "delete old jobs' artifacts (DELETE /api/v1/jobs/{id}) or ask an admin to free space, then retry"
        )


# --- failure reasons ---------------------------------------------------------------------------


def _late_cancel() -> BaseException:
    from worker.engine.errors import JobCancelled

    return JobCancelled("cancelled")


def _is_cancel(exc: BaseException) -> bool:
    errors = sys.modules.get("worker.engine.errors")
    return errors is not None and isinstance(exc, errors.JobCancelled)


def _expected(exc: BaseException) -> bool:
    errors = sys.modules.get("worker.engine.errors")
    return isinstance(exc, Refused) or (errors is not None and isinstance(exc, errors.EngineError))


def _is_cuda_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def describe_failure(exc: BaseException, spec: dict[str, Any], settings: Settings) -> str:
    """One line a person can act on."""
    cal = spec.get("calibration", {})
    if _is_cuda_oom(exc):
        nsamples, seqlen = cal.get("nsamples", 128), cal.get("seqlen")
        shorter = f"seqlen {seqlen} -> {max(8, seqlen // 2)}" if seqlen else "a seqlen below the model's context (e.g. 1024)"
        return (
            "CUDA out of memory: retry with fewer calibration samples "
            f"(nsamples {nsamples} -> {max(1, nsamples // 2)}) or a shorter sequence ({shorter}), "
            "or set evaluation.max_windows; a GPU with more free memory also helps"
        )
    if isinstance(exc, SoftTimeLimitExceeded):
        hours = settings.job_time_limit_s / 3600
        return f"stopped at the time limit of {hours:g} h (SPARSEGPT_JOB_TIME_LIMIT_S); use fewer samples or a smaller model"
    if isinstance(exc, MemoryError):
        return "the worker ran out of host memory loading or pruning the model; use a machine with more RAM or a smaller model"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if _expected(exc):
        lowered = text.lower()
        if ("gated" in lowered or "401" in lowered or "token" in lowered) and not os.environ.get("HF_TOKEN"):
            text += " (this worker has no HF_TOKEN: accept the model's licence on the Hub and set HF_TOKEN for the workers)"
        return text
    if isinstance(exc, OSError) and ("not a valid model identifier" in text or "Repository Not Found" in text):
        return f"model {spec.get('model')!r} was not found on the Hugging Face Hub or in the allowed directories"
    return f"internal error ({type(exc).__name__}: {text[:500]}); the worker's log has the traceback"


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out and out not in (float("inf"), float("-inf")) else None


def _label(name: str, labels: dict[str, str]) -> str:
    if name in labels:
        return labels[name]
    for path, label in labels.items():
        if name in (Path(path).name, Path(path).stem):
            return label
    return name


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)
