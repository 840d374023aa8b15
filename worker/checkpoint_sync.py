"""The engine's per-block checkpoints (worker.engine.resume) mirrored to the shared store, so a
job whose machine was lost resumes on another one where it stopped.

The engine writes them to ``<data dir>/artifacts/<job>/resume`` on the worker running it. With
SPARSEGPT_STORAGE_URL set, a thread of that attempt copies what the engine committed there to
``checkpoints/<job>/`` in the store every heartbeat interval: the files that ``state.json`` (the
commit point) names first, ``state.json`` itself last, then the objects it no longer names are
deleted; so the store always holds a whole checkpoint, never a state naming a missing file. An
attempt that starts with no checkpoint of its own fetches the store's (``state.json`` last); the
engine then takes it up if its fingerprint matches, or starts over. The job's end deletes them.
No torch here: the worker's main process imports this module.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from app import storage

log = logging.getLogger(__name__)
STATE = "state.json"  # worker.engine.resume.STATE (not imported: that module loads torch)


def prefix(job_id: int) -> str:
    return f"checkpoints/{int(job_id)}"


class CheckpointSync:
    def __init__(self, store: storage.S3Store, job_id: int, directory: Path, *, interval_s: float):
        self.store, self.job_id, self.dir, self.interval_s = store, job_id, Path(directory), interval_s
        self.sent: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) as last uploaded
        self.remote: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def pull(self) -> int:
        """Fetch the store's checkpoint when this machine has none; returns the files fetched."""
        if (self.dir / STATE).exists():
            return 0
        found = self.store.list(prefix(self.job_id))
        self.remote = set(found)
        if STATE not in found:
            return 0
        names = [n for n in found if n != STATE and "/" not in n and not n.startswith(".")] + [STATE]
        for name in names:  # the commit point last: an interrupted fetch leaves none, the engine starts over
            self.store.fetch(self.store.url(f"{prefix(self.job_id)}/{name}"), self.dir / name)
        for name in names:
            stat = (self.dir / name).stat()
            self.sent[name] = (stat.st_size, stat.st_mtime_ns)
        log.info("job %s: fetched its checkpoint (%d files) from the store", self.job_id, len(names))
        return len(names)

    def push(self) -> bool:
        """Copy the latest committed checkpoint; False when it moved on while being read (next time)."""
        try:
            state_bytes = (self.dir / STATE).read_bytes()
            state = json.loads(state_bytes)
        except (OSError, ValueError):
            return True  # nothing committed yet
        named = [f"block-{int(i):05d}.safetensors" for i in state.get("blocks", [])]
        if state.get("hidden"):
            named.append(str(state["hidden"]))
        for name in named:
            path = self.dir / name
            try:
                stat = path.stat()
            except FileNotFoundError:
                return False  # replaced since the state was read
            if self.sent.get(name) != (stat.st_size, stat.st_mtime_ns):
                self.store.put_file(f"{prefix(self.job_id)}/{name}", path)
                self.sent[name] = (stat.st_size, stat.st_mtime_ns)
                self.remote.add(name)
        if self.sent.get(STATE) != (len(state_bytes), hash(state_bytes)):
            self.store.put_bytes(f"{prefix(self.job_id)}/{STATE}", state_bytes, "application/json")
            self.sent[STATE] = (len(state_bytes), hash(state_bytes))
            self.remote.add(STATE)
        for name in sorted(self.remote - set(named) - {STATE}):  # files the committed state left behind
            self.store.delete(self.store.url(f"{prefix(self.job_id)}/{name}"))
            self.remote.discard(name)
            self.sent.pop(name, None)
        return True

    def start(self) -> CheckpointSync:
        self._thread = threading.Thread(target=self._loop, name=f"checkpoints-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.push()
            except Exception as err:  # the store restarting: the next round copies it
                log.warning("job %s: checkpoint not copied to the store: %s", self.job_id, err)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


def for_job(settings, job_id: int, directory: Path) -> CheckpointSync | None:
    store = storage.get_store(settings)
    if store is None:
        return None
    return CheckpointSync(store, job_id, directory, interval_s=max(0.5, settings.heartbeat_interval_s))


def drop(settings, job_id: int) -> None:
    """The job ended: its checkpoints leave the store (no attempt resumes)."""
    store = storage.get_store(settings)
    if store is None:
        return
    try:
        store.delete_prefix(prefix(job_id))
    except storage.StorageError as err:
        log.warning("job %s: %s", job_id, err)
