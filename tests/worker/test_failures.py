"""Failure reasons (worker/failures.py) for real exceptions (issue 11, items 9 and 16).

- The "no HF_TOKEN" hint goes with real authentication failures only: huggingface_hub's own
  errors, made by its own ``hf_raise_for_status`` from the Hub's answers (gated, invalid token,
  401 for a private repo), as the engine rewords them; never with a tokenizer that cannot be
  loaded or a text too short in tokens (both said "token", and got the hint).
- Out of memory ends the job with what to lower: torch's CPU allocator refusing (a
  RuntimeError, before: "internal error"), Python's MemoryError, CUDA's OutOfMemoryError.
"""

from __future__ import annotations

import httpx2
import pytest
import torch
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import hf_raise_for_status

from app.config import Settings
from worker.engine.calibration import calibration_windows
from worker.engine.checkpoint import _explain_load_error, load_model
from worker.engine.errors import DataError, EngineError, ModelNotFound
from worker.failures import describe_failure, is_auth_failure

HINT = "this worker has no HF_TOKEN"
SPEC = {"model": "org/model", "calibration": {"nsamples": 128, "seqlen": 2048}}
URL = "https://huggingface.co/org/model/resolve/main/config.json"


@pytest.fixture(autouse=True)
def no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path_factory.mktemp("data"))


def hub_error(status: int, **headers: str) -> HfHubHTTPError:
    """The exception huggingface_hub raises for this answer of the Hub."""
    try:
        hf_raise_for_status(httpx2.Response(status, headers=headers, request=httpx2.Request("GET", URL)))
    except HfHubHTTPError as err:
        return err
    raise AssertionError("no error raised")


def as_the_engine_reports(err: Exception) -> EngineError:
    """The engine's rewording of a loading error (``raise ... from None`` keeps it as context)."""
    try:
        try:
            raise err
        except Exception as exc:
            raise _explain_load_error("org/model", exc) from None
    except EngineError as reworded:
        return reworded


@pytest.mark.parametrize(
    "answer",
    [
        {
            "status": 401,
            "X-Error-Code": "GatedRepo",
            "X-Error-Message": "Access to model org/model is restricted. "
            "You must have access to it and be authenticated to access it. Please log in.",
        },
        {
            "status": 403,
            "X-Error-Code": "GatedRepo",
            "X-Error-Message": "Access to model org/model is restricted and you "
            "are not in the authorized list. Visit https://huggingface.co/org/model to ask for access.",
        },
        {"status": 401, "X-Error-Message": "Invalid credentials in Authorization header"},
        {"status": 401, "X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},  # private, no token
    ],
    ids=["gated-401", "gated-403", "invalid-token", "private-repo"],
)
def test_the_hint_goes_with_authentication_failures(answer, settings):
    status = answer.pop("status")
    err = hub_error(status, **answer)
    assert is_auth_failure(err)
    reason = describe_failure(as_the_engine_reports(err), SPEC, settings)
    assert HINT in reason and "set HF_TOKEN for the workers" in reason, reason


def test_real_exception_types():
    assert isinstance(hub_error(401, **{"X-Error-Code": "GatedRepo"}), GatedRepoError)
    assert isinstance(hub_error(404, **{"X-Error-Code": "RepoNotFound"}), RepositoryNotFoundError)


def test_no_hint_for_a_repository_that_does_not_exist(settings):
    """A 404 says "private or gated repo ... your token" in its help text: not an auth failure."""
    err = hub_error(404, **{"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
    assert not is_auth_failure(err)
    try:
        try:
            raise err
        except HfHubHTTPError:
            raise ModelNotFound(
                "model 'org/model' was not found (neither a local directory nor a Hub model id)"
            ) from None
    except ModelNotFound as reported:
        reason = describe_failure(reported, SPEC, settings)
    assert "was not found" in reason and HINT not in reason


def test_no_hint_for_a_tokenizer_that_cannot_be_loaded(tmp_path, settings):
    from tests.support.tiny_models import make_tiny_model

    make_tiny_model(tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").unlink()  # a model directory without its tokenizer
    with pytest.raises(ModelNotFound) as caught:
        load_model(str(tmp_path / "model"), dtype=torch.float32)
    assert "tokenizer" in str(caught.value).lower()
    reason = describe_failure(caught.value, SPEC, settings)
    assert "could not be loaded" in reason and HINT not in reason, reason


def test_no_hint_for_a_text_too_short_in_tokens(tmp_path, settings):
    from tests.support.tiny_models import make_tokenizer

    text = tmp_path / "short.txt"
    text.write_text("a few words only\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        calibration_windows(make_tokenizer(), str(text), nsamples=4, seqlen=64, seed=0)
    assert "tokens" in str(caught.value)
    reason = describe_failure(caught.value, SPEC, settings)
    assert reason == str(caught.value) and HINT not in reason


def test_the_engine_gated_message_keeps_its_hint(settings):
    reason = describe_failure(
        ModelNotFound("model 'org/model' is gated: accept its licence on the Hub and set HF_TOKEN"), SPEC, settings
    )
    assert HINT in reason


def test_host_memory_exhausted_by_torch(settings):
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**50, dtype=torch.uint8)  # a PiB: the CPU allocator refuses
    reason = describe_failure(caught.value, SPEC, settings)
    assert reason.startswith("the worker ran out of host memory") and "not retried" in reason
    assert "lower nsamples (128) or seqlen (2048)" in reason and "internal error" not in reason


def test_memory_error_and_cuda_oom(settings):
    with pytest.raises(MemoryError) as caught:
        bytearray(2**62)
    assert describe_failure(caught.value, SPEC, settings).startswith("the worker ran out of host memory")
    cuda = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total)")
    reason = describe_failure(cuda, SPEC, settings)
    assert reason.startswith("CUDA out of memory") and "nsamples 128 -> 64" in reason


def test_a_missing_repo_is_not_called_gated():
    """The Hub's 404 help text says "a private or gated repo" for every missing id: the engine
    must say the model was not found, not that it is gated."""
    err = hub_error(404, **{"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
    assert "gated" in str(err).lower()  # the help text the old check tripped on
    reworded = _explain_load_error("org/model", err)
    assert "was not found" in str(reworded) and "is gated" not in str(reworded), reworded
    gated = _explain_load_error("org/model", hub_error(403, **{"X-Error-Code": "GatedRepo"}))
    assert "is gated" in str(gated), gated
