"""Why a job stopped, in one line a person can act on (what the job row's ``error`` says).

A cancel is not a failure (``is_cancel``); an expected error (``is_expected``: the engine's own,
or the server refusing the job) is reported in its own words, anything else as an internal
error whose traceback goes to the worker's log. No torch here: a CUDA error is recognised
through ``sys.modules`` (torch is loaded whenever the engine ran).
"""

from __future__ import annotations

import os
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


def describe_failure(exc: BaseException, spec: dict[str, Any], settings: Settings) -> str:
    """One line a person can act on; ``spec`` is the job's spec as stored."""
    cal = spec.get("calibration", {})
    if is_cuda_oom(exc):
        nsamples, seqlen = cal.get("nsamples", 128), cal.get("seqlen")
        shorter = f"seqlen {seqlen} -> {max(8, seqlen // 2)}" if seqlen else "a seqlen below the model's context (e.g. 1024)"
        return (
            "CUDA out of memory: retry with fewer calibration samples "
            f"(nsamples {nsamples} -> {max(1, nsamples // 2)}) or a shorter sequence ({shorter}), "
            "or set evaluation.max_windows; a GPU with more free memory also helps"
        )
    if isinstance(exc, SoftTimeLimitExceeded):
        hours = settings.job_time_limit_s / 3600
        return f"stopped at the time limit of {hours:g} h (SPARSEGPT_JOB_TIME_LIMIT_S); use fewer samples or a smaller model"
    if isinstance(exc, MemoryError):
        return "the worker ran out of host memory loading or pruning the model; use a machine with more RAM or a smaller model"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if is_expected(exc):
        lowered = text.lower()
        if ("gated" in lowered or "401" in lowered or "token" in lowered) and not os.environ.get("HF_TOKEN"):
            text += " (this worker has no HF_TOKEN: accept the model's licence on the Hub and set HF_TOKEN for the workers)"
        return text
    if isinstance(exc, OSError) and ("not a valid model identifier" in text or "Repository Not Found" in text):
        return f"model {spec.get('model')!r} was not found on the Hugging Face Hub or in the allowed directories"
    return f"internal error ({type(exc).__name__}: {text[:500]}); the worker's log has the traceback"
