"""A short-lived, per-process memory of whom a credential names (issue 22, an API that keeps up).

Every request with a Bearer token or a session cookie looked its user up in the database; under
load the same few credentials are looked up hundreds of times a second. A positive answer is
kept for ``TTL_S`` (monotonic clock), keyed by the database and the credential (a token's
sha256, a cookie's whole signed value); a refusal is never kept, so a new token works at once.

The price: a token replaced or a user removed by another process (``sparsegpt users``), or a
session ended in another API process, still works for at most ``TTL_S``. A logout in this
process forgets this process's entries at once (app.sessions.end_session).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

TTL_S = 0.5  # well under the time a `sparsegpt users` command takes to start and run
MAX_ENTRIES = 4096  # bounded: a flood of distinct valid credentials just empties it

T = TypeVar("T")
_entries: dict[tuple[str, str, str], tuple[float, object]] = {}
_lock = threading.Lock()


def remembered(database: str, kind: str, key: str, look_up: Callable[[], T | None]) -> T | None:
    """``look_up()``'s answer for this credential, from memory while it is younger than TTL_S;
    None answers (no such user) are not kept."""
    entry_key = (database, kind, key)
    now = time.monotonic()
    entry = _entries.get(entry_key)
    if entry is not None and entry[0] > now:
        return entry[1]  # type: ignore[return-value]
    value = look_up()
    if value is not None and TTL_S > 0:
        with _lock:
            if len(_entries) >= MAX_ENTRIES:
                _entries.clear()
            _entries[entry_key] = (now + TTL_S, value)
    return value


def forget_all() -> None:
    """After a logout (or any revocation made in this process): nothing remembered stands."""
    with _lock:
        _entries.clear()


def peek(database: str, kind: str, key: str) -> object | None:
    """The remembered answer for this credential while it is younger than TTL_S, else None
    (nothing is looked up)."""
    entry = _entries.get((database, kind, key))
    return entry[1] if entry is not None and entry[0] > time.monotonic() else None
