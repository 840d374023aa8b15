"""A job's memory on the worker: its size checked before calibrating, its process watched while it
runs, and an out-of-memory kill told apart from any other SIGKILL. No torch here.

- ``check_loaded_model``: the estimate of ``worker.engine.contract.estimate`` (the API's, before queueing)
  again with what the worker knows once the model is loaded: its config, exact parameter count,
  working dtype, device and seqlen. Too large: ``Refused`` (failed, not retried).
- ``MemoryWatch`` (run by the heartbeat thread, ``worker.liveness``): the task process's resident
  memory every second, recorded in Redis (``sample_key``) with the memory limit it runs under;
  above ``SPARSEGPT_WORKER_MAX_RSS_GB`` (0: off) the job is failed with the numbers and the
  process killed at once, before the kernel's OOM killer picks a victim.
- ``oom_evidence``: when the pool's process died by SIGKILL, whether the kernel's OOM killer did
  it: the OOM-kill counter of the worker's memory cgroup (v2 ``memory.events``, v1
  ``memory.oom_control``) went up while the job ran, or (no cgroup counter) the machine's
  (``/proc/vmstat``) did and the job's process held at least half the memory, or its last
  reading was within 5 % of the limit. A person's ``kill -9`` moves no counter: that attempt is
  retried as before.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.engine.contract.estimate import GB, JobSize, estimate, estimate_method
from worker.job_inputs import Refused

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
SAMPLE_TTL_S = 7 * 24 * 3600
NEAR_LIMIT = 0.95  # a last reading this close to the limit: the kernel killed it for memory
BIG_SHARE = 0.5  # with only the machine-wide counter: the job held at least this share


# --- readings ----------------------------------------------------------------------------------


def process_memory(pid: int | str = "self") -> tuple[int, int] | None:
    """(resident, peak resident) bytes of a process, from /proc/<pid>/status. Resident is the memory
    the kernel cannot drop (RssAnon + RssShmem): the model's memory-mapped weights are file pages it
    reclaims and reads again (worker.engine.offload), so a model larger than the limit does not trip
    it. The peak is VmHWM (all resident pages, file pages included), the kernel's only peak."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem"):
                    values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if "VmRSS" not in values:
        return None
    resident = values["RssAnon"] + values.get("RssShmem", 0) if "RssAnon" in values else values["VmRSS"]
    return resident, max(values.get("VmHWM", 0), resident)


def _cgroup_dirs() -> list[tuple[str, Path]]:
    """("v2" | "v1", directory) of this process's memory cgroup, as mounted here."""
    found = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":
            bases = [CGROUP_ROOT / rel, CGROUP_ROOT, CGROUP_ROOT / "unified" / rel]
            kind, probe = "v2", "memory.max"
        elif "memory" in controllers.split(","):
            bases = [CGROUP_ROOT / "memory" / rel, CGROUP_ROOT / "memory"]
            kind, probe = "v1", "memory.limit_in_bytes"
        else:
            continue
        for base in bases:
            if (base / probe).is_file():
                found.append((kind, base))
                break
    return found


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _field(path: Path, name: str) -> int | None:
    """``name N`` in a flat-keyed file (memory.events, memory.oom_control, /proc/vmstat)."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def memory_limit() -> int | None:
    """The most memory this process's cgroup may use, or the machine's RAM, whichever is less."""
    limits = []
    for kind, base in _cgroup_dirs():
        value = _read_int(base / ("memory.max" if kind == "v2" else "memory.limit_in_bytes"))
        if value is not None and value < 1 << 60:  # "max" / the v1 "unlimited" sentinel
            limits.append(value)
    try:  # "MemTotal:       16315988 kB"
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal:"))
        total = int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        total = None
    if total is not None:
        limits.append(total)
    return min(limits) if limits else None


@dataclass(frozen=True)
class OomCounters:
    cgroup: int | None  # OOM kills in this process's memory cgroup (None: no such counter here)
    system: int | None  # OOM kills on the machine since boot (/proc/vmstat)


def oom_counters() -> OomCounters:
    cgroup = None
    for kind, base in _cgroup_dirs():
        value = _field(base / ("memory.events" if kind == "v2" else "memory.oom_control"), "oom_kill")
        if value is not None:
            cgroup = value if cgroup is None else max(cgroup, value)
    return OomCounters(cgroup=cgroup, system=_field(Path("/proc/vmstat"), "oom_kill"))


def oom_evidence(before: OomCounters | None, after: OomCounters, sample: dict[str, Any] | None) -> str | None:
    """Why a SIGKILLed job process is taken for an out-of-memory kill, or None (another kill)."""
    rss, peak, limit = (int((sample or {}).get(k) or 0) for k in ("rss", "peak", "limit"))
    if before is not None:
        if before.cgroup is not None and after.cgroup is not None:
            if after.cgroup > before.cgroup:
                return "the worker's memory cgroup counted an OOM kill"
        elif before.system is not None and after.system is not None and after.system > before.system:
            if limit and peak >= BIG_SHARE * limit:
                return "the kernel OOM-killed a process while this job held most of the memory"
    if limit and rss >= NEAR_LIMIT * limit:
        return "its last memory reading was at the limit"
    return None


def oom_reason(sample: dict[str, Any] | None) -> str:
    peak, limit = (int((sample or {}).get(k) or 0) for k in ("peak", "limit"))
    used = f" (peak ~{peak / GB:.1f} GB of {limit / GB:.1f} GB)" if peak and limit else ""
    return (
        f"the worker process was killed by the out-of-memory killer while running this job{used}; "
        "not retried: lower nsamples or seqlen (or evaluation.max_windows), or use a worker with more memory"
    )


# --- the task process, watched by its heartbeat thread -----------------------------------------------


def sample_key(job_id: int) -> str:
    return f"sparsegpt:job:{job_id}:memory"


def read_sample(client, job_id: int) -> dict[str, Any] | None:
    try:
        raw = client.get(sample_key(job_id))
        return json.loads(raw) if raw else None
    except Exception:  # Redis down: the reason goes without numbers
        return None


class MemoryWatch:
    """Reads the process's memory; records it; trips once above ``max_rss_bytes`` (0: never)."""

    def __init__(self, client, job_id: int, attempt: int, *, max_rss_bytes: int, on_over_limit: Callable[[str], None]):
        self.client, self.job_id, self.attempt = client, job_id, attempt
        self.max_rss_bytes = max_rss_bytes
        self.on_over_limit = on_over_limit
        self.limit = memory_limit()
        self.tripped = threading.Event()
        self._recorded_peak = 0
        self._recorded_at = 0.0

    def check(self, *, record_every_s: float) -> None:
        reading = process_memory()
        if reading is None:
            return
        rss, peak = reading
        now = time.monotonic()
        # Recorded on the heartbeat's cadence, and at once when the peak grew by a tenth: what
        # the worker's main process reads back when this process is killed.
        if now - self._recorded_at >= record_every_s or peak > 1.1 * self._recorded_peak:
            self._record(rss, peak, now)
        if self.max_rss_bytes > 0 and rss > self.max_rss_bytes and not self.tripped.is_set():
            self.tripped.set()
            self._record(rss, peak, now)
            self.on_over_limit(
                f"the job's worker process used {rss / GB:.3f} GB, above this worker's limit of "
                f"{self.max_rss_bytes / GB:g} GB (SPARSEGPT_WORKER_MAX_RSS_GB); stopped and not retried: "
                "lower nsamples or seqlen (or evaluation.max_windows), or use a worker with more memory"
            )

    def _record(self, rss: int, peak: int, now: float) -> None:
        self._recorded_at, self._recorded_peak = now, peak
        body = {"attempt": self.attempt, "pid": os.getpid(), "rss": rss, "peak": peak, "limit": self.limit}
        try:
            self.client.set(sample_key(self.job_id), json.dumps(body), ex=SAMPLE_TTL_S)
        except Exception as err:  # Redis restarting: the next reading tries again
            log.debug("job %s: memory sample not recorded: %s", self.job_id, err)


# --- the job's size, once the model is loaded ----------------------------------------------------------


def _text_bytes(name: str) -> int | None:
    if "/" not in name:
        return None  # a built-in set
    try:
        return Path(name).stat().st_size
    except OSError:
        return 0


def check_loaded_model(facts: dict[str, Any], spec, max_job_memory_gb: float) -> None:
    """``run_job``'s ``on_loaded``: the job's estimate with the loaded model's facts; refused
    (failed, not retried) when it is above SPARSEGPT_MAX_JOB_MEMORY_GB."""
    if max_job_memory_gb <= 0:
        return
    size = JobSize(
        method=estimate_method(spec.method, spec.sparsity_profile),
        nsamples=spec.calibration.nsamples,
        seqlen=facts.get("seqlen"),
        dtype=facts["dtype"],
        device=facts["device"],
        max_windows=spec.evaluation.max_windows,
        mapped=bool(facts.get("mapped")),
        stored=facts.get("stored"),
        eval_sets=tuple((name, _text_bytes(name)) for name in spec.evaluation.datasets),
    )
    found = estimate(facts.get("config") or {}, size, parameters=facts.get("parameters"))
    refusal = found.refusal(max_job_memory_gb) if found is not None else None
    if refusal:
        raise Refused(refusal)
