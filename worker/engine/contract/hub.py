"""Whether the Hugging Face Hub can be reached, asked once and quickly, before anything is fetched.

Without a network, huggingface_hub retries each request for about a minute (printing a warning
per try) before transformers gives up. So before a Hub model or a built-in dataset is fetched,
one bounded request to ``HF_ENDPOINT`` (4 s in all, no retries) tells whether the Hub answers at
all; any HTTP answer below 500 counts (a 401 or 404 is left to the real load to explain). When it does not
answer, a model already in the local cache is loaded from it, anything else fails at once with
one line on what to do. ``HF_HUB_OFFLINE`` skips the question. No torch here.
"""

from __future__ import annotations

import os
import threading
import time
from urllib.parse import quote

PROBE_TIMEOUT_S = 4.0
_REMEMBER_S = 30.0  # one answer serves the model, then its datasets
_answers: dict[str, tuple[float, str | None]] = {}
_pending: dict[str, tuple[threading.Thread, list]] = {}


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def unreachable(repo: str = "", revision: str | None = None, *, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub answers; else why not, in a few words. Bounded by ``timeout_s`` whatever
    the network does (DNS included: the request runs in a thread of its own)."""
    base = endpoint()
    hit = _answers.get(base)
    if hit is not None and time.monotonic() - hit[0] < _REMEMBER_S:
        return hit[1]
    thread, result = _pending.get(base) or start(repo, revision, timeout_s=timeout_s)
    thread.join(timeout_s + 0.5)
    _pending.pop(base, None)
    answer = result[0] if result else f"no answer from {base} within {timeout_s:g} s"
    _answers[base] = (time.monotonic(), answer)
    return answer


def start(repo: str = "", revision: str | None = None, *, timeout_s: float = PROBE_TIMEOUT_S):
    """Ask the Hub in the background now (the CLI does while torch loads); ``unreachable`` reads
    the answer. (thread, a list that receives the answer)"""
    base = endpoint()
    url = f"{base}/{repo}/resolve/{quote(revision or 'main', safe='')}/config.json" if repo else f"{base}/api/whoami-v2"
    result: list[str | None] = []

    def ask() -> None:
        import httpx

        try:
            with httpx.Client(
                timeout=httpx.Timeout(timeout_s, connect=timeout_s), follow_redirects=False, trust_env=True
            ) as client:
                status = client.head(url).status_code
            # a 5xx would be retried for a minute as well; a 401 or 404 is the real load's to explain
            result.append(f"{base} answers HTTP {status}" if status >= 500 else None)
        except httpx.TimeoutException:
            result.append(f"no answer from {base} within {timeout_s:g} s")
        except httpx.HTTPError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            result.append(f"{base} cannot be reached ({reason})")
        except Exception as exc:  # noqa: BLE001 (a broken proxy setting or URL: the same for the user)
            result.append(f"{base} cannot be reached ({type(exc).__name__}: {exc})")

    thread = threading.Thread(target=ask, name="hub-probe", daemon=True)
    thread.start()
    _pending[base] = (thread, result)
    return thread, result


def what_to_do(kind: str, name: str, why: str) -> str:
    """The one line for a Hub model (not in the cache) or a built-in dataset that cannot be fetched now."""
    if kind == "model":
        return (
            f"model {name!r} is not in this machine's Hugging Face cache and the Hub cannot be reached: {why}. "
            f"Offline? Download it beforehand where there is network (`hf download {name}`, same HF_HOME) "
            "and set HF_HUB_OFFLINE=1, or use a local model directory instead"
        )
    return (
        f"the {name} dataset comes from the Hugging Face Hub, which cannot be reached: {why}. Offline? Set "
        "HF_HUB_OFFLINE=1 if it was fetched here before (it is read from the cache then), or use a local "
        "text file (.txt or .jsonl) instead"
    )


def cached_model(model: str, revision: str | None) -> bool:
    """The model's config.json is in the local Hugging Face cache (its weights then likely too)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")  # as set now
        found = try_to_load_from_cache(model, "config.json", revision=revision, cache_dir=cache)
    except Exception:  # noqa: BLE001 (an unusual cache layout: treat as not cached)
        return False
    return isinstance(found, str)


def one_copy_of_hub_logs() -> None:
    """huggingface_hub prints its warnings through a handler of its own AND passes them on to the
    root logger: with the CLI's or the worker's handler there, every line came twice."""
    import logging

    if not logging.getLogger().handlers:
        return
    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        if type(handler) is logging.StreamHandler:
            hub_logger.removeHandler(handler)


# The Hub repositories behind the built-in sets (worker.engine.calibration loads them from these).
DATASET_REPOS = {"c4": "allenai/c4", "wikitext2": "Salesforce/wikitext", "ptb": "ptb-text-only/ptb_text_only"}


def datasets_offline() -> bool:
    return offline() or os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_dataset(name: str) -> bool:
    """A built-in set has files in this machine's Hugging Face caches (the Hub's download cache or
    the datasets library's own), so an offline load can find it."""
    from pathlib import Path

    repo = DATASET_REPOS.get(name)
    if repo is None:
        return False
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub")
    data_cache = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets")
    org, _, repo_name = repo.partition("/")
    for directory in (hub_cache / f"datasets--{org}--{repo_name}", data_cache / f"{org}___{repo_name}"):
        try:
            if directory.is_dir() and any(directory.iterdir()):
                return True
        except OSError:
            continue
    return False


def model_unavailable(model: str, revision: str | None) -> str | None:
    """Why a Hub model cannot be loaded here now (offline or the Hub unreachable, and not in the
    cache), in words a person can act on; None when it can (or the Hub will say itself)."""
    if cached_model(model, revision):
        return None
    if offline():
        return (
            f"model {model!r} is not in this server's Hugging Face cache and the server is offline "
            f"(HF_HUB_OFFLINE): download it there beforehand (`hf download {model}`, same HF_HOME) "
            "or use a local model directory"
        )
    why = unreachable(model, revision)
    return what_to_do("model", model, why) if why is not None else None


def dataset_unavailable(name: str) -> str | None:
    """Why a built-in set cannot be loaded here now; None when it can (or the Hub will say itself)."""
    if name not in DATASET_REPOS:
        return None
    if datasets_offline():
        if cached_dataset(name):
            return None
        return (
            f"the {name} dataset comes from the Hugging Face Hub and is not in this server's cache, and the "
            "server is offline (HF_HUB_OFFLINE): use a local text file (.txt or .jsonl) or an upload instead"
        )
    why = unreachable()
    return what_to_do("dataset", name, why) if why is not None else None
