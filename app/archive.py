"""The artifact as one tar archive, produced on the fly and byte-for-byte reproducible.

The worker hashes the stream once when the job ends (size and sha256 go in the database);
the API streams the same bytes on download, so the pruned directory is kept only once on
disk and the sha256 people see matches what they receive.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1024 * 1024
BLOCK = tarfile.BLOCKSIZE  # 512
MEDIA_TYPE = "application/x-tar"


def artifact_name(job_id: int) -> str:
    """The archive's top directory (and download file name without .tar)."""
    return f"sparsegpt-job-{job_id}"


def _members(root: Path) -> list[Path]:
    return sorted(
        (p for p in root.rglob("*") if p.is_file() and not p.is_symlink()), key=lambda p: p.relative_to(root).as_posix()
    )


def _header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def _segments(root: Path, prefix: str) -> Iterator[tuple[int, bytes | Path]]:
    """The stream's pieces in order, each (length, bytes or a file to read that many bytes of).

    Every member carries the job's save time (the newest file's modification time, whole seconds),
    not 1970; the files are never modified after the save, so the stream stays the same bytes."""
    members = _members(root)
    mtime = max((int(p.stat().st_mtime) for p in members), default=0)
    for path in members:
        size = path.stat().st_size
        header = _header(f"{prefix}/{path.relative_to(root).as_posix()}", size, mtime)
        yield len(header), header
        yield size, path
        if size % BLOCK:
            yield BLOCK - size % BLOCK, b"\0" * (BLOCK - size % BLOCK)
    yield 2 * BLOCK, b"\0" * (2 * BLOCK)  # end-of-archive marker


def iter_tar(root: Path, prefix: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The regular files under ``root`` as a tar stream, each named ``prefix/<relative path>``;
    with ``start``/``end``, only those bytes (end exclusive) of the same stream: a resumed
    download (HTTP Range) gets exactly what the full one would have had there."""
    offset = 0
    for length, piece in _segments(root, prefix):
        if end is not None and offset >= end:
            return
        lo, hi = max(start - offset, 0), length if end is None else min(length, end - offset)
        if lo < hi:
            if isinstance(piece, bytes):
                yield piece[lo:hi]
            else:
                yield from _read(piece, length, lo, hi)
        offset += length


def _read(path: Path, size: int, lo: int, hi: int) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(lo)
        while lo < hi:
            chunk = handle.read(min(CHUNK, hi - lo))
            if not chunk:
                raise OSError(f"{path} shrank while it was archived")
            lo += len(chunk)
            yield chunk
    if path.stat().st_size != size:
        raise OSError(f"{path} changed size while it was archived")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """One ``bytes=`` range of an HTTP Range header as (start, end exclusive); None to send the
    whole stream (no header, another unit, several ranges, or a malformed one: RFC 9110 lets a
    server ignore those); "unsatisfiable" when it starts at or past the end (416)."""
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if (
        not dash
        or not (first.isdigit() or last.isdigit())
        or (first and not first.isdigit())
        or (last and not last.isdigit())
        or len(first) > 20
        or len(last) > 20
    ):
        return None
    if not first:  # bytes=-N: the last N bytes
        n = int(last)
        return (max(size - n, 0), size) if n > 0 and size > 0 else "unsatisfiable"
    start = int(first)
    stop = min(int(last) + 1, size) if last else size
    if start >= size:
        return "unsatisfiable"
    if stop <= start:
        return None  # last < first: invalid, ignored
    return start, stop


def digest(root: Path, prefix: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of ``iter_tar(root, prefix)``."""
    sha = hashlib.sha256()
    size = 0
    for chunk in iter_tar(root, prefix):
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()
