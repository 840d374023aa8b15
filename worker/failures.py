"""Why a job stopped, in one line a person can act on (what the job row's ``error`` says).

A cancel is not a failure (``is_cancel``); an expected error (``is_expected``: the engine's own,
or the server refusing the job) is reported in its own words, anything else as an internal
error whose traceback goes to the worker's log. No torch here: a CUDA error is recognised
through ``sys.modules`` (torch is loaded whenever the engine ran). Running out of memory (CUDA,
or host memory: MemoryError, torch's CPU allocator) fails the job with what to lower; it is
not retried (the task records the failure and returns). The "no HF_TOKEN" hint is added only
to real authentication failures (``is_auth_failure``), never to a tokenizer's or a data error.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from app.config import Settings
from worker.engine.errors import EngineError, JobCancelled
from worker.job_inputs import Refused


def late_cancel() -> JobCancelled:
    """A cancel that came after the engine's last check (the result is not kept)."""
    return JobCancelled("cancelled")


def is_cancel(exc: BaseException) -> bool:
    return isinstance(exc, JobCancelled)


def is_expected(exc: BaseException) -> bool:
    """An error whose message is meant for the user (logged without a traceback)."""
    return isinstance(exc, (Refused, EngineError))


def is_cuda_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


# Hugging Face Hub answers that mean "you need (another) token": gated repos, bad tokens, 401/403.
_AUTH_TEXT = re.compile(
    r"access (?:a )?gated repo|\bis gated\b|invalid user token|invalid credentials|invalid username or password"
    r"|\b40[13] client error\b|\b401 unauthorized\b|not in the authorized list",
    re.IGNORECASE,
)


def _chain(exc: BaseException):
    """The exception and those it was raised from or while handling (the engine rewords the
    Hub's errors, ``raise ... from None`` keeps them as the context)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 16:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def is_auth_failure(exc: BaseException) -> bool:
    """The Hub refused the worker's credentials: a gated repo, an invalid token, a 401/403
    (a private repo answers 401 "not found" to a request without a token)."""
    try:
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        GatedRepoError = HfHubHTTPError = ()  # noqa: N806
    for err in _chain(exc):
        if isinstance(err, GatedRepoError):
            return True
        if isinstance(err, HfHubHTTPError) and _http_status(err) in (401, 403):
            return True
        if _AUTH_TEXT.search(str(err)):
            return True
    return False


def is_host_oom(exc: BaseException) -> bool:
    """Host memory ran out: MemoryError, or torch's CPU allocator refusing (a RuntimeError)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return (
        isinstance(exc, RuntimeError)
        and "CPUAllocator" in text
        and ("can't allocate memory" in text or "not enough memory" in text)
    )


def describe_failure(exc: BaseException, spec: dict[str, Any], settings: Settings) -> str:
    """One line a person can act on; ``spec`` is the job's spec as stored."""
    cal = spec.get("calibration", {})
    if is_cuda_oom(exc):
        nsamples, seqlen = cal.get("nsamples", 128), cal.get("seqlen")
        shorter = (
            f"seqlen {seqlen} -> {max(8, seqlen // 2)}" if seqlen else "a seqlen below the model's context (e.g. 1024)"
        )
        return (
            "CUDA out of memory: retry with fewer calibration samples "
            f"(nsamples {nsamples} -> {max(1, nsamples // 2)}) or a shorter sequence ({shorter}), "
            "or set evaluation.max_windows; a GPU with more free memory also helps"
        )
    if isinstance(exc, SoftTimeLimitExceeded):
        hours = settings.job_time_limit_s / 3600
        return (
            f"stopped at the time limit of {hours:g} h (SPARSEGPT_JOB_TIME_LIMIT_S); use fewer samples or a "
            "smaller model"
        )
    if is_host_oom(exc):
        nsamples, seqlen = cal.get("nsamples", 128), cal.get("seqlen") or "the default"
        return (
            "the worker ran out of host memory loading, calibrating or pruning the model (not retried): "
            f"lower nsamples ({nsamples}) or seqlen ({seqlen}), set evaluation.max_windows, "
            "or use a smaller model or a worker with more RAM"
        )
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if is_expected(exc):
        if is_auth_failure(exc) and not os.environ.get("HF_TOKEN"):
            text += (
                " (this worker has no HF_TOKEN: accept the model's licence on the Hub and set HF_TOKEN for the workers)"
            )
        return text
    if isinstance(exc, OSError) and ("not a valid model identifier" in text or "Repository Not Found" in text):
        return f"model {spec.get('model')!r} was not found on the Hugging Face Hub or in the allowed directories"
    return f"internal error ({type(exc).__name__}: {text[:500]}); the worker's log has the traceback"
