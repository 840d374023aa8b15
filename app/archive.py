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
    return sorted((p for p in root.rglob("*") if p.is_file() and not p.is_symlink()), key=lambda p: p.relative_to(root).as_posix())


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def iter_tar(root: Path, prefix: str) -> Iterator[bytes]:
    """The regular files under ``root`` as a tar stream, each named ``prefix/<relative path>``."""
    for path in _members(root):
        size = path.stat().st_size
        yield _header(f"{prefix}/{path.relative_to(root).as_posix()}", size)
        sent = 0
        with path.open("rb") as handle:
            while sent < size:
                chunk = handle.read(min(CHUNK, size - sent))
                if not chunk:
                    raise OSError(f"{path} shrank while it was archived")
                sent += len(chunk)
                yield chunk
        if size % BLOCK:
            yield b"\0" * (BLOCK - size % BLOCK)
    yield b"\0" * (2 * BLOCK)  # end-of-archive marker


def digest(root: Path, prefix: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of ``iter_tar(root, prefix)``."""
    sha = hashlib.sha256()
    size = 0
    for chunk in iter_tar(root, prefix):
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()
