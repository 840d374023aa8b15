"""What would fail later is refused at submit, with what to do: a local directory that holds no
loadable model, a Hub model or a built-in set that this server can neither reach nor find cached."""

from __future__ import annotations

import secrets
import shutil
import socket
import time

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.support.stacks import SMALL
from worker.engine.contract import hub


@pytest.fixture(scope="module")
def client(tmp_path_factory, models_dir, redis_available):
    data = tmp_path_factory.mktemp("submit-checks")
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "empty").mkdir()
    shutil.copytree(models_dir / "llama", allowed / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copytree(models_dir / "llama", allowed / "no-tokenizer", ignore=shutil.ignore_patterns("tokenizer*"))
    shutil.copytree(models_dir / "llama", allowed / "ok")
    (allowed / "gguf-only").mkdir()
    (allowed / "gguf-only" / "model.Q4.gguf").write_bytes(b"GGUF")
    (allowed / "calib.txt").write_text((models_dir / "calib.txt").read_text())
    settings = Settings(
        _env_file=None,
        data_dir=str(data),
        database_url=f"sqlite:///{data}/db.sqlite",
        redis_url="redis://127.0.0.1:6379/13",
        local_dirs=str(allowed),
        queue=f"idle-{secrets.token_hex(3)}",
        auth="off",
        max_active_jobs_per_user=0,
        sweep_interval_s=0,
    )
    with TestClient(create_app(settings)) as test_client:
        test_client.allowed = allowed
        yield test_client


def post(client, model, dataset=None, evaluation=()):
    body = {
        "model": model,
        "sparsity": 0.5,
        "calibration": {"dataset": dataset or str(client.allowed / "calib.txt"), **SMALL},
        "evaluation": {"datasets": list(evaluation)},
    }
    return client.post("/api/v1/jobs", json=body)


def reasons(response) -> str:
    return " | ".join(d["msg"] for d in response.json()["detail"])


@pytest.mark.parametrize(
    "directory,missing",
    [
        ("empty", "holds no loadable model: config.json is missing"),
        ("no-weights", "has config.json but no weights (*.safetensors or *.bin)"),
        ("no-tokenizer", "no tokenizer files"),
    ],
)
def test_a_directory_without_a_loadable_model_is_refused_naming_what_is_missing(client, directory, missing):
    response = post(client, str(client.allowed / directory))
    assert response.status_code == 422 and missing in reasons(response), response.text
    assert str(client.allowed) not in reasons(response)  # named by its own name, not the server's path


@pytest.mark.parametrize("directory", ["ok", "gguf-only"])
def test_a_loadable_directory_is_queued(client, directory):
    response = post(client, str(client.allowed / directory))
    assert response.status_code == 201, response.text


def test_offline_a_hub_model_or_builtin_set_not_in_the_cache_is_refused(client, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    response = post(client, "facebook/opt-350m")  # not in the session's cache (tests/support/hub_cache.py)
    assert response.status_code == 422 and "not in this server's Hugging Face cache" in reasons(response)
    assert "hf download facebook/opt-350m" in reasons(response)
    assert post(client, "facebook/opt-125m").status_code == 201  # cached here: accepted
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    response = post(client, str(client.allowed / "ok"), dataset="c4", evaluation=["wikitext2"])
    assert response.status_code == 422, response.text
    assert [d["loc"][-1] for d in response.json()["detail"]] == ["dataset", 0]
    assert "use a local text file" in reasons(response)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_is_a_422_at_once_unless_the_model_is_cached(client, monkeypatch, tmp_path):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # scripts/test sets all three
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    hub._answers.clear()
    t0 = time.monotonic()
    response = post(client, "facebook/opt-350m", dataset="c4")
    assert time.monotonic() - t0 < 10
    assert response.status_code == 422, response.text
    text = reasons(response)
    assert "cannot be reached" in text and "hf download facebook/opt-350m" in text and "the c4 dataset" in text
    assert post(client, "facebook/opt-125m").status_code == 201  # in the cache: the worker loads it from there
    hub._answers.clear()
