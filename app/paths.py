"""Local paths that jobs name: resolved (symlinks included) and kept under allowed directories."""

from __future__ import annotations

from pathlib import Path


class PathNotAllowed(ValueError):
    """A path outside the allowed directories, missing, or of the wrong kind; the message says which."""


def resolve_allowed(value: str, allowed: list[Path], *, kind: str) -> Path:
    """``value`` resolved, if it is an existing ``kind`` ("dir" or "file") under one of ``allowed``."""
    if not allowed:
        raise PathNotAllowed(
            f"{value!r}: this server allows no local paths (SPARSEGPT_LOCAL_DIRS is empty; "
            "`sparsegpt serve --allow-dir DIR` allows one)"
        )
    try:
        path = Path(value).expanduser().resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as err:  # symlink loops, NUL bytes
        raise PathNotAllowed(f"{value!r} cannot be resolved: {err}") from None
    if not any(path == root or path.is_relative_to(root) for root in allowed):
        raise PathNotAllowed(f"{value!r} is outside the server's allowed directories ({', '.join(map(str, allowed))})")
    if kind == "dir" and not path.is_dir():
        raise PathNotAllowed(f"{value!r} is not a directory on the server")
    if kind == "file" and not path.is_file():
        raise PathNotAllowed(f"{value!r} is not a file on the server")
    return path
