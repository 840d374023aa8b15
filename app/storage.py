"""Where a job's lasting files are kept: one interface, two stores, and no caller asks which.

``Store`` names objects by a *name* (``uploads/<sha256>.txt``, ``artifacts/<job>/<file>``,
``checkpoints/<job>/<file>``) and hands back a *location*, the string a database row keeps: a
path in the data directory (``LocalStore``, SPARSEGPT_STORAGE_URL unset: one machine) or an
object URL (``S3Store`` in app/s3_store.py, ``s3://bucket/prefix``: every machine reaches it).

- ``put_file`` / ``put_bytes``: a file or bytes in (an upload, a job's report).
- ``publish``: an artifact packaged from a saved model directory (app/packagers.py). The local
  store keeps only the directory and packages it again on every read (packagers are byte for
  byte reproducible, so the sha256 holds); the S3 store streams the package into an object.
- ``read`` (a byte range of an artifact), ``intact`` (still there and whole), ``holds`` (cheap:
  this store's location), ``local_file`` (a file on this machine, fetched once when remote).
- ``delete`` / ``delete_prefix``; ``locked`` serializes putting a file in place with removing one.
- ``mirror``: a directory the engine writes (per-block checkpoints) followed into the store, so
  another machine resumes from it; in the local store the directory already is the store's copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.mirror import Mirror
    from app.packagers import Packager

READ_BYTES = 1024 * 1024
log = logging.getLogger(__name__)
SCHEME = "s3://"


class StorageError(RuntimeError):
    """The store refused or could not be reached; the message says which object and why."""


def is_stored(path: str | None) -> bool:
    """Whether a location names an object in an S3 store (rather than a path on a machine)."""
    return bool(path) and str(path).startswith(SCHEME)


class Store(ABC):
    """A job's lasting files: uploads, artifacts, reports and per-block checkpoints."""

    place = "in the store"  # where its files are, in words ("... is no longer in the store")

    @abstractmethod
    def location(self, name: str) -> str:
        """Where ``name`` is (or would be) kept."""

    @abstractmethod
    def holds(self, location: str | None) -> bool:
        """Cheap: ``location`` is this store's (and, where that costs nothing, it is there)."""

    @abstractmethod
    def put_file(self, name: str, path: Path) -> str:
        """The file at ``path`` kept as ``name`` (it is moved or uploaded: the caller drops ``path``)."""

    @abstractmethod
    def put_bytes(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> str: ...

    @abstractmethod
    def publish(self, name: str, model_dir: Path, packager: Packager, prefix: str) -> tuple[str, int, str]:
        """The package of ``model_dir`` (its top name ``prefix``) kept as ``name``: (location, size, sha256)."""

    @abstractmethod
    def read(
        self, location: str, packager: Packager, prefix: str, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """Bytes [start, end) of the artifact at ``location`` (published with ``packager``)."""

    @abstractmethod
    def intact(self, location: str, size: int) -> bool:
        """The artifact at ``location`` is still there, whole (StorageError: the store is unreachable)."""

    @abstractmethod
    def local_file(self, location: str, sha256: str | None = None) -> Path:
        """A file on this machine with the content at ``location`` (fetched and checked once when remote)."""

    @abstractmethod
    def delete(self, location: str) -> None:
        """Remove what ``location`` names; a location of no store of this kind is left alone."""

    @abstractmethod
    def delete_prefix(self, name: str) -> int:
        """Everything under ``name/``; returns how many objects (or top entries) went."""

    @abstractmethod
    def mirror(
        self, directory: Path, name: str, *, named: Callable[[dict], list[str]], state: str, interval_s: float
    ) -> Mirror:
        """``directory`` (committed by its ``state`` file, which ``named`` reads) followed under ``name``."""

    def locked(self) -> AbstractContextManager:
        """Putting a file in place and removing one, one at a time (across processes) where that matters."""
        return nullcontext()


class LocalStore(Store):
    """The data directory of this machine: uploads in ``uploads/``, a job's files in ``artifacts/<job>/``
    (its checkpoints in ``artifacts/<job>/resume/``). A location is the absolute path; only paths
    under those two directories are ever read, served or deleted (rows never name others, and
    that is checked again)."""

    place = "on the server"

    def __init__(self, data_dir: Path):
        self.root = Path(data_dir).resolve()
        self.areas = (self.root / "uploads", self.root / "artifacts")

    def path(self, name: str) -> Path:
        area, _, rest = name.strip("/").partition("/")
        if ".." in name.split("/") or area not in ("uploads", "artifacts", "checkpoints"):
            raise ValueError(f"{name!r} is not a name of this store")
        if area == "checkpoints":  # <job>/<file>: beside the job's attempts, where the engine writes them
            job, _, file = rest.partition("/")
            return self.root / "artifacts" / job / "resume" / file if file else self.root / "artifacts" / job / "resume"
        return self.root / area / rest

    def location(self, name: str) -> str:
        return str(self.path(name))

    def _inside(self, location: str | None) -> Path | None:
        if not location or is_stored(location):
            return None
        path = Path(location).resolve()
        return path if any(path.is_relative_to(area) and path != area for area in self.areas) else None

    def holds(self, location: str | None) -> bool:
        path = self._inside(location)
        return path is not None and path.exists()

    def put_file(self, name: str, path: Path) -> str:
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, target)
        except OSError as err:
            raise StorageError(f"could not keep {target}: {err.strerror or err}") from err
        return str(target)

    def put_bytes(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            temporary.write_bytes(data)
            os.replace(temporary, target)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            raise StorageError(f"could not keep {target}: {err.strerror or err}") from err
        return str(target)

    def publish(self, name: str, model_dir: Path, packager: Packager, prefix: str) -> tuple[str, int, str]:
        size, sha = packager.digest(model_dir, prefix)  # made again at each download: nothing else on disk
        return str(model_dir), size, sha

    def read(
        self, location: str, packager: Packager, prefix: str, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        path = self._inside(location)
        if path is None or not path.is_dir():
            raise StorageError(f"{location} is not an artifact of this server")
        return packager.iter_bytes(path, prefix, start, end)

    def intact(self, location: str, size: int) -> bool:
        path = self._inside(location)
        return path is not None and path.is_dir()

    def local_file(self, location: str, sha256: str | None = None) -> Path:
        if is_stored(location):
            raise StorageError(f"{location} is in an object store but SPARSEGPT_STORAGE_URL is not set on this machine")
        return Path(location)

    def delete(self, location: str) -> None:
        path = self._inside(location)
        if path is None:
            return
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def delete_prefix(self, name: str) -> int:
        target = self.path(name.rstrip("/"))
        if not target.exists():
            return 0
        count = sum(1 for _ in target.iterdir()) if target.is_dir() else 1
        self.delete(str(target))
        return count

    def mirror(
        self, directory: Path, name: str, *, named: Callable[[dict], list[str]], state: str, interval_s: float
    ) -> Mirror:
        from app.mirror import Mirror

        return Mirror()  # one machine: every attempt finds the directory itself

    @contextmanager
    def locked(self):
        (self.root / "uploads").mkdir(parents=True, exist_ok=True)
        with open(self.root / "uploads" / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


_stores: dict[tuple, Store] = {}
_stores_lock = threading.Lock()


def get_store(settings) -> Store:
    """The settings' store, one per (URL or data directory) and process: S3 when
    SPARSEGPT_STORAGE_URL is set, else the data directory."""
    url = (settings.storage_url or "").strip()
    key = (url, str(settings.data_dir), settings.upload_retention_s)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            if url:
                from app.s3_store import S3Store

                store = S3Store(
                    url, cache_dir=settings.data_dir / "cache" / "uploads", cache_max_age_s=settings.upload_retention_s
                )
            else:
                store = LocalStore(settings.data_dir)
            store = _stores[key] = store
        return store


def cached_upload(settings, url: str, sha256: str | None = None) -> Path:
    """A stored upload as a file on this machine (app/s3_store.py: a content-addressed cache)."""
    return get_store(settings).local_file(url, sha256)


class DigestMismatch(StorageError):
    """A whole object streamed out did not hash to its recorded sha256 (the body is cut short)."""


def verified(chunks: Iterator[bytes], sha256: str, label: str) -> Iterator[bytes]:
    """``chunks`` passed on while hashed; the last chunk is held back until the whole has been
    hashed, and on a mismatch it is never sent: the error (logged) ends the body short of its
    Content-Length (or without the final chunk of a chunked body), so a client sees a failed
    download, never a complete-looking wrong file. Only a whole object can be checked."""
    digest, held = hashlib.sha256(), None
    for chunk in chunks:
        if not chunk:
            continue
        digest.update(chunk)
        if held is not None:
            yield held
        held = chunk
    if digest.hexdigest() != sha256:
        log.error(
            "%s does not match its recorded sha256 (%s, streamed %s): download aborted",
            label,
            sha256,
            digest.hexdigest(),
        )
        raise DigestMismatch(f"{label} does not match its recorded sha256")
    if held is not None:
        yield held


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(READ_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def __getattr__(name: str):
    if name == "S3Store":  # the second store, importable from here as before (lazily: it imports this module)
        from app.s3_store import S3Store

        return S3Store
    raise AttributeError(name)
