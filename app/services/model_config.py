"""A model's config.json as the API reads it for the memory estimate: a local directory's, or a Hub
model's alone (one bounded GET). The estimate itself is the contract's (worker.engine.contract.estimate)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from worker.engine.contract.estimate import UnreadableConfig
from worker.engine.contract.patterns import SparsityPattern
from worker.engine.contract.spec_quant import linear_widths

MAX_CONFIG_BYTES = 4 * 1024 * 1024
HUB_TIMEOUT_S = 5.0  # a Hub fetch's TOTAL deadline (connection, redirects, body)
HUB_MAX_FETCHES = 4  # Hub fetches at once in this process; more: left to the worker


def local_config(directory: str | Path) -> dict[str, Any] | None:
    """``config.json`` of a model directory (already resolved under the allowed directories);
    None when there is none (a GGUF file) or it is not a small JSON object; an ``UnreadableConfig``
    (refused by ``estimate``) when it is nested too deeply to parse."""
    path = Path(directory) / "config.json"
    try:
        if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    except RecursionError:  # json.loads recurses once per [ or {: a 4 MiB file can nest 4M deep
        return UnreadableConfig(
            "the model's config.json is nested too deeply to be read (no transformers config "
            "nests more than a few levels); fix the model's config.json"
        )
    return data if isinstance(data, dict) else None


def nm_width_message(config: dict[str, Any], pattern: SparsityPattern) -> str | None:
    """For an N:M pattern, the layers (from config.json) whose input width is not a multiple of M,
    in one sentence; None when every width is (or the pattern is not N:M). The engine would leave
    such a layer's last columns dense; a plan, whose points are compared by size, refuses it."""
    if not pattern.structured:
        return None
    widths = linear_widths(config)
    bad = [(kind, width) for kind, width in widths if width % pattern.m]
    if not bad:
        return None
    layers = "; ".join(f"{kind} {width} wide" for kind, width in bad)
    fits = [m for m in (4, 8, 16, 32) if m > pattern.n and all(w % m == 0 for _, w in widths)]
    offer = f" (an M that divides every width: {', '.join(map(str, fits))})" if fits else ""
    return (
        f"sparsity {pattern}: M={pattern.m} does not divide the input width of {layers}; its last "
        f"columns could not follow the pattern: choose another N:M{offer}"
    )


_hub_cache: dict[tuple[str, str | None], tuple[float, dict[str, Any] | None]] = {}
_hub_lock = threading.Lock()
_hub_slots = threading.BoundedSemaphore(HUB_MAX_FETCHES)
HUB_CACHE_S = 600.0  # a config read is kept this long
HUB_FAILURE_CACHE_S = 60.0  # and a failure (not a busy skip) this long
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _fetch_config(url: str, token: str | None, deadline: float) -> dict[str, Any] | None:
    """ONE streaming GET (redirects followed, no retries), at most ``MAX_CONFIG_BYTES`` read and
    nothing written to disk; None on any failure or once past ``deadline`` (monotonic)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = httpx.Timeout(max(0.1, deadline - time.monotonic()))
    with (
        httpx.Client(timeout=timeout, follow_redirects=True, max_redirects=5) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        length = response.headers.get("content-length", "")
        if response.status_code != 200 or (length.isdigit() and int(length) > MAX_CONFIG_BYTES):
            return None
        body = bytearray()
        for chunk in response.iter_bytes():  # (each read is bounded by the timeout above)
            body += chunk
            if len(body) > MAX_CONFIG_BYTES or time.monotonic() > deadline:
                return None
    data = json.loads(bytes(body).decode("utf-8"))
    return data if isinstance(data, dict) else None


def hub_config(
    model: str, revision: str | None, *, token: str | None = None, timeout_s: float = HUB_TIMEOUT_S
) -> dict[str, Any] | None:
    """Only ``config.json`` of a Hub model, fetched here (``HF_ENDPOINT``, ``HF_TOKEN``): one GET
    of at most ``MAX_CONFIG_BYTES``, not kept in the Hub's cache, within ``timeout_s`` in all;
    None when it cannot be had (offline, gated, not found, slow, too big, or ``HUB_MAX_FETCHES``
    fetches already under way): the worker estimates it then. Called in the API's request
    threads: the caller waits ``timeout_s`` at most, whatever the network does (the fetch runs in
    a thread of its own, which holds its slot until httpx's timeouts end it). Results are cached
    (a config ``HUB_CACHE_S``, a failure ``HUB_FAILURE_CACHE_S``)."""
    key = (model, revision)
    with _hub_lock:
        hit = _hub_cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < (HUB_CACHE_S if hit[1] is not None else HUB_FAILURE_CACHE_S):
            return hit[1]
    if _offline() or not _REPO_ID.match(model) or ".." in model or len(model) > 96:
        return None
    if not _hub_slots.acquire(blocking=False):
        return None  # busy: not cached, the next job may find a slot
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{model}/resolve/{quote(revision or 'main', safe='')}/config.json"
    deadline = time.monotonic() + timeout_s
    found: list[dict[str, Any] | None] = []

    def fetch() -> None:
        config = None
        try:
            config = _fetch_config(url, token or os.environ.get("HF_TOKEN"), deadline)
        except Exception:  # noqa: BLE001 (network, TLS, bad JSON: not this check's business)
            config = None
        finally:
            _hub_slots.release()
            found.append(config)
            with _hub_lock:
                if len(_hub_cache) > 256:
                    _hub_cache.clear()
                _hub_cache[key] = (time.monotonic(), config)

    thread = threading.Thread(target=fetch, name=f"hub_config {model}", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()) + 0.05)
    return found[0] if found else None
