"""A directory the engine writes, followed into a store that other machines reach.

The directory is committed by one state file (JSON) that names the files it needs (``named``
reads them from it). A thread copies what was committed into the store every ``interval_s``:
the files the state names first, the state file itself last, then the objects it no longer
names are deleted; so the store always holds a whole commit, never a state naming a missing
file. ``pull`` fetches the store's commit (the state file last) when this machine has none.

``Mirror`` is the store that needs none (the local one: the directory already is its copy);
``DirectoryMirror`` is the S3 store's. No torch here: the worker's main process imports it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


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
    def __init__(self, store, name: str, directory: Path, *, named: Callable[[dict], list[str]], state: str,
                 interval_s: float):
        self.store, self.name, self.dir, self.named, self.state = store, name.rstrip("/"), Path(directory), named, state
        self.interval_s = interval_s
        self.sent: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) as last uploaded
        self.remote: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _object(self, file: str) -> str:
        return f"{self.name}/{file}"

    def pull(self) -> int:
        """Fetch the store's commit when this machine has none; returns the files fetched."""
        if (self.dir / self.state).exists():
            return 0
        found = self.store.list(self.name)
        self.remote = set(found)
        if self.state not in found:
            return 0
        files = [n for n in found if n != self.state and "/" not in n and not n.startswith(".")] + [self.state]
        for file in files:  # the commit point last: an interrupted fetch leaves none, the engine starts over
            self.store.fetch(self.store.location(self._object(file)), self.dir / file)
        for file in files:
            stat = (self.dir / file).stat()
            self.sent[file] = (stat.st_size, stat.st_mtime_ns)
        log.info("%s: fetched its checkpoint (%d files) from the store", self.name, len(files))
        return len(files)

    def push(self) -> bool:
        """Copy the latest commit; False when it moved on while being read (next time)."""
        try:
            state_bytes = (self.dir / self.state).read_bytes()
            named = self.named(json.loads(state_bytes))
        except (OSError, ValueError):
            return True  # nothing committed yet
        for file in named:
            path = self.dir / file
            try:
                stat = path.stat()
            except FileNotFoundError:
                return False  # replaced since the state was read
            if self.sent.get(file) != (stat.st_size, stat.st_mtime_ns):
                self.store.put_file(self._object(file), path)
                self.sent[file] = (stat.st_size, stat.st_mtime_ns)
                self.remote.add(file)
        if self.sent.get(self.state) != (len(state_bytes), hash(state_bytes)):
            self.store.put_bytes(self._object(self.state), state_bytes, "application/json")
            self.sent[self.state] = (len(state_bytes), hash(state_bytes))
            self.remote.add(self.state)
        for file in sorted(self.remote - set(named) - {self.state}):  # files the committed state left behind
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
