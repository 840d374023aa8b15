"""A directory the engine writes, followed into a store that other machines reach.

The directory is committed by one state file (JSON) that names the files it needs (``named``
reads them from it). A thread copies what was committed into the store every ``interval_s``:
the files the state names first, the state file itself last, then the objects it no longer
names are deleted; so the store always holds a whole commit, never a state naming a missing
file. ``pull`` fetches the store's commit (the state file last) when this machine has none.

``Mirror`` is the store that needs none (the local one: the directory already is its copy);
``DirectoryMirror`` is the S3 store's. No torch here: the worker's main process imports it.

The store is shared, not trusted (issue 22, item 2): with a ``Guard`` every file name must match
its pattern (never a path), each push records the sha256 of the commit's files in a trusted place
(the job's row) before the state goes up, and ``pull`` takes a commit up only when every file it
fetched matches that record; otherwise it discards what it fetched (the engine starts at block 0).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Guard:
    """What a fetched commit is checked against: the file names allowed (``names`` fully matches
    each, the state file's included) and the trusted record of their sha256 (``record`` writes
    {name: sha256} for a commit, ``recorded`` reads the last one; None: nothing recorded)."""

    names: re.Pattern
    record: Callable[[dict[str, str]], None]
    recorded: Callable[[], dict[str, str] | None]

    def allows(self, name: str) -> bool:
        return isinstance(name, str) and "/" not in name and self.names.fullmatch(name) is not None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Mirror:
    """Nothing to follow: every attempt on this machine finds the directory itself."""

    def pull(self) -> int:
        return 0

    def push(self) -> bool:
        return True

    def start(self) -> Mirror:
        return self

    def stop(self) -> None:
        pass


class DirectoryMirror(Mirror):
    def __init__(
        self, store, name: str, directory: Path, *, named: Callable[[dict], list[str]], state: str, interval_s: float
    ):
        self.store, self.name, self.dir, self.named, self.state = store, name.rstrip("/"), Path(directory), named, state
        self.interval_s = interval_s
        self.guard: Guard | None = None
        self.sent: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) as last uploaded
        self.hashes: dict[str, str] = {}  # name -> sha256 as last uploaded (what the guard records)
        self.remote: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def guarded(self, guard: Guard) -> DirectoryMirror:
        self.guard = guard
        return self

    def _object(self, file: str) -> str:
        return f"{self.name}/{file}"

    def _allowed(self, name: str) -> bool:
        if self.guard is not None:
            return self.guard.allows(name)
        return isinstance(name, str) and "/" not in name and not name.startswith(".") and name not in ("", "..")

    def pull(self) -> int:
        """Fetch the store's commit when this machine has none; returns the files fetched (0: none
        taken up: nothing there, or a commit the guard's record does not vouch for, discarded)."""
        if (self.dir / self.state).exists():
            return 0
        found = self.store.list(self.name)
        self.remote = set(found)
        if self.state not in found:
            return 0
        expected = self.guard.recorded() if self.guard is not None else None
        if self.guard is not None and (not expected or self.state not in expected):
            log.warning(
                "%s: the store holds a checkpoint the database has no record of: not taken up, starting from block 0",
                self.name,
            )
            return 0
        names = sorted(expected) if expected else [n for n in found if n != self.state]
        files = [n for n in names if n != self.state and self._allowed(n)]
        if expected and (len(files) + 1 != len(expected) or not set(files) <= set(found)):
            return self._discard(files, "names files that the database's record or the store lacks")
        self.dir.mkdir(parents=True, exist_ok=True)
        pending = self.dir / f".{self.state}.fetched"  # the commit point goes in place once all is checked
        for file in files:
            self.store.fetch(self.store.location(self._object(file)), self.dir / file)
        self.store.fetch(self.store.location(self._object(self.state)), pending)
        fetched = {**{f: self.dir / f for f in files}, self.state: pending}
        hashes = {name: sha256_of(path) for name, path in fetched.items()}
        if expected and hashes != expected:
            wrong = sorted(n for n in hashes if hashes[n] != expected.get(n))
            return self._discard([*files, pending.name], f"does not match the database's record ({', '.join(wrong)})")
        pending.replace(self.dir / self.state)
        for file in [*files, self.state]:
            stat = (self.dir / file).stat()
            self.sent[file] = (stat.st_size, stat.st_mtime_ns)
            self.hashes[file] = hashes[file]
        log.info("%s: fetched its checkpoint (%d files) from the store", self.name, len(files) + 1)
        return len(files) + 1

    def _discard(self, files: list[str], why: str) -> int:
        for file in files:
            (self.dir / file).unlink(missing_ok=True)
        log.warning("%s: the checkpoint in the store %s: discarded, starting from block 0", self.name, why)
        return 0

    def push(self) -> bool:
        """Copy the latest commit; False when it moved on while being read (next time)."""
        try:
            state_bytes = (self.dir / self.state).read_bytes()
            named = self.named(json.loads(state_bytes))
        except (OSError, ValueError):
            return True  # nothing committed yet
        bad = [file for file in named if not self._allowed(file)]
        if bad:
            log.warning("%s: the state names %r, not a checkpoint file name: not copied", self.name, bad[0])
            return True
        for file in named:
            path = self.dir / file
            try:
                stat = path.stat()
            except FileNotFoundError:
                return False  # replaced since the state was read
            if self.sent.get(file) != (stat.st_size, stat.st_mtime_ns):
                if self.guard is not None:
                    self.hashes[file] = sha256_of(path)
                self.store.put_file(self._object(file), path)
                self.sent[file] = (stat.st_size, stat.st_mtime_ns)
                self.remote.add(file)
        if self.sent.get(self.state) != (len(state_bytes), hash(state_bytes)):
            if self.guard is not None:  # recorded before the state goes up: the store never leads the record
                self.guard.record(
                    {**{f: self.hashes[f] for f in named}, self.state: hashlib.sha256(state_bytes).hexdigest()}
                )
            self.store.put_bytes(self._object(self.state), state_bytes, "application/json")
            self.sent[self.state] = (len(state_bytes), hash(state_bytes))
            self.remote.add(self.state)
        for file in sorted(self.remote - set(named) - {self.state}):  # files the committed state left behind
            if self._allowed(file):
                self.store.delete(self.store.location(self._object(file)))
            self.remote.discard(file)
            self.sent.pop(file, None)
        return True

    def start(self) -> DirectoryMirror:
        self._thread = threading.Thread(target=self._loop, name=f"mirror-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.push()
            except Exception as err:  # the store restarting: the next round copies it
                log.warning("%s: not copied to the store: %s", self.name, err)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
