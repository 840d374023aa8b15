"""The sweeper: what no redelivery would fix, found from the database and put right.

- A running job whose heartbeat is older than SPARSEGPT_HEARTBEAT_TIMEOUT: its worker vanished
  (the whole worker killed, the machine lost) and the broker will not hand the message out again
  before the visibility timeout (hours). It goes back to queued with a new run message, or ends
  failed past the attempt limit (cancelled when a cancel was asked).
- A queued job whose run message is in no broker queue (Redis restarted without persistence,
  or the API died between the commit and the send): the message is sent again.
- Artifacts older than the retention time: marked expired, then their files removed.
- Uploaded calibration sets older than SPARSEGPT_UPLOAD_RETENTION_S: the row and the file
  deleted, unless a queued or running job names them (they go in a later round).
- Compression plans not finished (or with a job active again): advanced (app/services/plans.py:
  their next jobs queued as the user's cap allows, a budget's finished job judged).

Every message sent again keeps the job's priority (a "low" plan's jobs stay behind ordinary ones).

Every change is a compare-and-set on the job row, so sweepers in several processes and a worker's
own heartbeat or claim never both move a job; a duplicate message is harmless too (the worker's
claim is a compare-and-set). Besides, sweepers take turns: a round runs only in the process that
holds the Redis lock ``sparsegpt:sweeper:lock`` (``SweepLock``; it expires 3 rounds after its
holder stops renewing it, so a killed holder is replaced). It runs on a thread in the API process
and as its own process, ``sparsegpt sweeper`` (``run_sweeper``): one per server keeps lost jobs
requeued while the API is down (Celery beat is not part of the embedded setup).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import redis as redis_lib

from app import crud, streams
from app.config import Settings
from app.job_files import JobFiles
from app.models import utcnow
from app.queue import enqueue_job
from app.services import plans, upload_store
from app.storage import StorageError

log = logging.getLogger("sparsegpt.sweeper")

# kombu's Redis transport: one list per priority step, and the hash of delivered, unacked messages.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
UNACKED_KEY = "unacked"
SCAN_LIMIT = 20_000
LOCK_KEY = f"{streams.PREFIX}:sweeper:lock"
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


@dataclass
class SweepReport:
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    resent: list[int] = field(default_factory=list)
    expired: list[int] = field(default_factory=list)
    uploads_deleted: list[int] = field(default_factory=list)
    plans_advanced: list[int] = field(default_factory=list)
    upload_temps_removed: list[str] = field(default_factory=list)
    sessions_purged: int = 0
    errors: list[str] = field(default_factory=list)


def broker_messages(r: redis_lib.Redis, queue: str) -> str:
    """Every waiting and delivered-but-unacked message for ``queue``, as one text to search."""
    parts: list[str] = []
    for step in PRIORITY_STEPS:
        key = queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}"
        parts.extend(_text(x) for x in r.lrange(key, 0, SCAN_LIMIT))
    parts.extend(_text(x) for x in r.hvals(UNACKED_KEY))
    return "\n".join(parts)


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def new_task_id(job_id: int) -> str:
    return f"job-{job_id}-{uuid.uuid4().hex[:12]}"


def sweep_once(settings: Settings, sessions, r: redis_lib.Redis, *, send=enqueue_job) -> SweepReport:
    report = SweepReport()
    _release_stale(settings, sessions, r, report, send)
    _resend_lost(settings, sessions, r, report, send)
    _expire_artifacts(settings, sessions, report)
    _expire_uploads(settings, sessions, report)
    _remove_upload_temps(settings, report)
    _advance_plans(settings, sessions, report, send)
    with sessions() as session, session.begin():  # sign-ins that admit nobody any more
        report.sessions_purged = crud.purge_web_sessions(session)
    return report


def _release_stale(settings, sessions, r, report: SweepReport, send) -> None:
    with sessions() as session:  # the database's clock, which stamped the heartbeats
        before = crud.stale_before(settings.heartbeat_timeout_s, session)
        stale = crud.running_jobs_with_stale_heartbeat(session, stale_before=before)
    for job in stale:
        task_id = new_task_id(job.id)
        with sessions() as session:
            outcome = crud.release_stale(
                session, job, max_attempts=settings.max_attempts, stale_before=before, task_id=task_id
            )
            session.commit()
        if outcome is None:
            continue  # another process moved it first
        log.warning("job %s: heartbeat expired (worker %s, attempt %s): %s", job.id, job.worker, job.attempt, outcome)
        if outcome == "requeued":
            report.requeued.append(job.id)
            _publish_status(
                settings, r, job.id, "queued", job.attempt, "requeued: its worker stopped sending heartbeats"
            )
            try:
                send(settings, job.id, task_id=task_id, queue=job.queue or settings.queue, priority=job.priority)
            except Exception as err:  # the lost-message sweep sends it once the broker is back
                report.errors.append(f"job {job.id}: could not send: {err}")
        else:
            (report.failed if outcome == "failed" else report.cancelled).append(job.id)
            JobFiles(settings, job.id).remove_partials()
            with sessions() as session:
                row = crud.get_job(session, job.id)
                error = row.error if row else None
            _publish_status(settings, r, job.id, outcome, job.attempt, error, final=True)


def _resend_lost(settings, sessions, r, report: SweepReport, send) -> None:
    before = utcnow() - timedelta(seconds=settings.lost_message_grace_s)
    with sessions() as session:
        candidates = crud.queued_jobs_sent_before(session, before=before)
    if not candidates:
        return
    with sessions() as session:
        routes = crud.job_routes(session, [job_id for job_id, _ in candidates], default=settings.queue)
    present: dict[str, str] = {}
    try:
        for queue in {queue for queue, _ in routes.values()}:
            present[queue] = broker_messages(r, queue)
    except redis_lib.RedisError as err:
        report.errors.append(f"broker unreachable: {err}")
        return
    for job_id, task_id in candidates:
        queue, priority = routes[job_id]
        if task_id and task_id in present[queue]:
            continue
        new = new_task_id(job_id)
        with sessions() as session:
            won = crud.replace_task_id(session, job_id=job_id, old=task_id, new=new)
            session.commit()
        if not won:
            continue
        try:
            send(settings, job_id, task_id=new, queue=queue, priority=priority)
        except Exception as err:
            report.errors.append(f"job {job_id}: could not send: {err}")
            continue
        log.warning(
            "job %s: its run message %s was in no queue (Redis restarted?); sent it again as %s", job_id, task_id, new
        )
        report.resent.append(job_id)


def _expire_artifacts(settings, sessions, report: SweepReport) -> None:
    if settings.artifact_retention_s <= 0:
        return
    before = utcnow() - timedelta(seconds=settings.artifact_retention_s)
    with sessions() as session:
        jobs = crud.artifacts_to_expire(session, finished_before=before)
    for job in jobs:
        with sessions() as session:
            won = crud.mark_artifact_expired(session, job_id=job.id)
            session.commit()
        if not won:
            continue
        try:  # every format's file, here and in the store
            JobFiles(settings, job.id).delete_artifacts()
        except StorageError as err:
            report.errors.append(f"job {job.id}: {err}")
        report.expired.append(job.id)
        log.info("job %s: artifact deleted (older than %ss)", job.id, settings.artifact_retention_s)


def _expire_uploads(settings, sessions, report: SweepReport) -> None:
    if settings.upload_retention_s <= 0:
        return
    before = utcnow() - timedelta(seconds=settings.upload_retention_s)
    with sessions() as session:
        old = crud.calibration_sets_created_before(session, before=before)
        in_use = crud.uploads_in_use(session) if old else {}
    for set_id in old:
        if set_id in in_use:
            continue  # a queued or running job names it: a later round
        with sessions() as session:
            removal = upload_store.remove(session, settings, set_id)
        if removal.deleted:
            report.uploads_deleted.append(set_id)
            log.info("upload:%s deleted (older than %ss)", set_id, settings.upload_retention_s)


def _remove_upload_temps(settings: Settings, report: SweepReport) -> None:
    """Upload temp files an API killed mid-upload left behind (``upload_store.remove_stale_temps``)."""
    try:
        report.upload_temps_removed = upload_store.remove_stale_temps(settings.uploads_dir)
    except OSError as err:
        report.errors.append(f"upload temp files: {err}")


def _advance_plans(settings: Settings, sessions, report: SweepReport, send) -> None:
    """Each plan still running (or whose job was retried) advanced, in a session of its own."""
    with sessions() as session:
        plan_ids = crud.plans_to_advance(session)
    for plan_id in plan_ids:
        with sessions() as session:
            try:
                plans.advance(session, settings, plan_id, send=send)
            except Exception as err:  # noqa: BLE001 (one plan's trouble does not stop the others)
                session.rollback()
                report.errors.append(f"plan {plan_id}: {err}")
                continue
        report.plans_advanced.append(plan_id)


def _publish_status(settings, r, job_id, status, attempt, error, final=False) -> None:
    try:
        streams.publish(
            r,
            job_id,
            "status",
            {"status": status, "attempt": attempt, "error": error},
            maxlen=settings.events_maxlen,
            ttl_s=settings.events_ttl_s if final else None,
        )
    except redis_lib.RedisError:
        pass


class SweepLock:
    """Whose turn it is to sweep: a Redis key holding its owner's name, set only if absent and
    expiring ``ttl_s`` after the owner's last renewal (a killed owner is replaced then)."""

    def __init__(self, r: redis_lib.Redis, ttl_s: float, owner: str | None = None, key: str = LOCK_KEY):
        self.r, self.key, self.ttl_ms = r, key, max(1000, int(ttl_s * 1000))
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def hold(self) -> bool:
        """Take the lock, or renew it if it is ours; False while another process holds it."""
        if self.r.set(self.key, self.owner, nx=True, px=self.ttl_ms):
            return True
        return bool(self.r.eval(_RENEW, 1, self.key, self.owner, self.ttl_ms))

    def holder(self) -> str | None:
        value = self.r.get(self.key)
        return _text(value) if value is not None else None

    def release(self) -> None:
        try:
            self.r.eval(_RELEASE, 1, self.key, self.owner)
        except redis_lib.RedisError:
            pass


class Sweeper:
    """``sweep_once`` every ``settings.sweep_interval_s`` on a daemon thread, in the rounds when
    this process holds the sweep lock."""

    def __init__(self, settings: Settings, sessions, r: redis_lib.Redis, *, name: str | None = None):
        self.settings, self.sessions, self.r = settings, sessions, r
        self.lock = SweepLock(r, ttl_s=3 * settings.sweep_interval_s, owner=name)
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.rounds = 0  # rounds this process swept (held the lock)

    def start(self) -> None:
        if self.settings.sweep_interval_s <= 0:
            return
        self.thread = threading.Thread(target=self.loop, name="sparsegpt-sweeper", daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while not self.stop_event.wait(self.settings.sweep_interval_s):
            self.round()

    def round(self) -> SweepReport | None:
        """One round if this process holds the lock (None otherwise, or when it failed)."""
        try:
            if not self.lock.hold():
                return None
        except redis_lib.RedisError as err:  # Redis restarting: nobody sweeps this round
            log.debug("sweep lock unavailable: %s", err)
            return None
        try:
            report = sweep_once(self.settings, self.sessions, self.r)
        except Exception:  # the database restarting: next round
            log.exception("sweep failed")
            return None
        self.rounds += 1
        for error in report.errors:
            log.warning("sweep: %s", error)
        return report

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.lock.release()


def run_sweeper(settings: Settings, *, interval_s: float | None = None) -> int:
    """``sparsegpt sweeper``: the sweeper as a process of its own, until SIGTERM or SIGINT."""
    from app import db

    if interval_s is not None:
        settings = settings.model_copy(update={"sweep_interval_s": interval_s})
    if not settings.redis_url:
        raise SystemExit("sparsegpt sweeper: REDIS_URL is not set (the Redis the API and the workers use)")
    if settings.sweep_interval_s <= 0:
        raise SystemExit(
            "sparsegpt sweeper: the sweep interval must be above 0 (SPARSEGPT_SWEEP_INTERVAL_S, --interval)"
        )
    r = redis_lib.Redis.from_url(
        settings.redis, decode_responses=True, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30
    )
    sweeper = Sweeper(
        settings, db.session_factory(settings.database), r, name=f"sweeper@{socket.gethostname()}:{os.getpid()}"
    )
    signal.signal(signal.SIGTERM, lambda *_: sweeper.stop_event.set())
    log.info("sweeping every %ss (one sweeper at a time holds %s)", settings.sweep_interval_s, LOCK_KEY)
    try:
        sweeper.round()
        sweeper.loop()
    except KeyboardInterrupt:
        pass
    finally:
        sweeper.stop()
        r.close()
    return 0
