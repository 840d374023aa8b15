"""Every file of a local model resolves under the allowed directories (issue 22, item 1).

A link inside an allowed model directory (``chat_template.jinja -> /proc/self/environ``, or a
``model.safetensors`` from a model outside) is refused at submit (422 naming the file), on the
worker before the job starts (a failed job naming the file) and by the engine's loader.
"""

from __future__ import annotations

import os
import secrets
import shutil

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.model_links import escaped_file
from tests.support.stacks import SMALL
from worker.engine.checkpoint import load_model, save_pruned
from worker.engine.errors import InvalidJob
from worker.job_inputs import Refused, job_inputs


@pytest.fixture()
def dirs(tmp_path, models_dir):
    """An allowed directory with a clean model, one with a planted template link, one with a linked
    weights file from a model outside, and the outside itself."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    shutil.copytree(models_dir / "llama", outside / "other")
    (outside / "secret.txt").write_text("DATABASE_URL=postgresql://x:secret@db/x {{ bos_token }}")
    shutil.copytree(models_dir / "llama", allowed / "clean")
    (allowed / "clean" / "chat_template.jinja").write_text("{{ bos_token }}")
    shutil.copytree(models_dir / "llama", allowed / "template")
    os.symlink("/proc/self/environ", allowed / "template" / "chat_template.jinja")
    shutil.copytree(models_dir / "llama", allowed / "weights")
    (allowed / "weights" / "model.safetensors").unlink()
    os.symlink(outside / "other" / "model.safetensors", allowed / "weights" / "model.safetensors")
    shutil.copytree(models_dir / "llama", allowed / "nested")
    (allowed / "nested" / "extra").mkdir()
    os.symlink(outside / "secret.txt", allowed / "nested" / "extra" / "tokenizer.model")
    (allowed / "calib.txt").write_text((models_dir / "calib.txt").read_text())
    return allowed, outside


@pytest.mark.parametrize(
    "name,file",
    [("template", "chat_template.jinja"), ("weights", "model.safetensors"), ("nested", "extra/tokenizer.model")],
)
def test_a_link_out_of_the_allowed_directories_is_named(dirs, name, file):
    allowed, _ = dirs
    problem = escaped_file(allowed / name, [allowed])
    assert problem is not None and repr(file) in problem and "outside" not in problem
    assert escaped_file(allowed / "clean", [allowed]) is None


def test_a_link_between_allowed_directories_is_fine(dirs):
    allowed, outside = dirs
    assert escaped_file(allowed / "weights", [allowed, outside]) is None


def _settings(tmp_path, allowed, **extra) -> Settings:
    return Settings(
        _env_file=None,
        data_dir=str(tmp_path / "data"),
        database_url=f"sqlite:///{tmp_path}/db.sqlite",
        redis_url="redis://127.0.0.1:6379/13",
        local_dirs=str(allowed),
        min_free_disk_mb=0,
        **extra,
    )


def _spec(allowed, name) -> dict:
    return {
        "model": str(allowed / name),
        "sparsity": 0.5,
        "calibration": {"dataset": str(allowed / "calib.txt"), **SMALL},
        "evaluation": {"datasets": []},
    }


@pytest.mark.parametrize("name,file", [("template", "chat_template.jinja"), ("weights", "model.safetensors")])
def test_the_worker_refuses_the_job_naming_the_file(dirs, tmp_path, name, file):
    allowed, _ = dirs
    settings = _settings(tmp_path, allowed)
    with pytest.raises(Refused, match=repr(file)):
        job_inputs(_spec(allowed, name), settings)
    assert job_inputs(_spec(allowed, "clean"), settings).spec.model == str((allowed / "clean").resolve())


def test_submit_answers_422_naming_the_file(dirs, tmp_path, redis_available):
    allowed, _ = dirs
    settings = _settings(
        tmp_path,
        allowed,
        queue=f"idle-{secrets.token_hex(3)}",
        auth="off",
        max_active_jobs_per_user=0,
        sweep_interval_s=0,
    )
    with TestClient(create_app(settings)) as client:
        response = client.post("/api/v1/jobs", json=_spec(allowed, "template"))
        assert response.status_code == 422, response.text
        reason = " | ".join(d["msg"] for d in response.json()["detail"])
        assert "'chat_template.jinja'" in reason and "/proc" not in reason
        assert client.post("/api/v1/jobs", json=_spec(allowed, "clean")).status_code == 201


def test_the_loader_refuses_a_linked_file_right_before_loading(dirs):
    allowed, outside = dirs
    with pytest.raises(InvalidJob, match="'chat_template.jinja'"):
        load_model(str(allowed / "template"), dtype=None, allowed_roots=[allowed])
    with pytest.raises(InvalidJob, match="'model.safetensors'"):
        load_model(str(allowed / "weights"), dtype=None, allowed_roots=[allowed])
    model, _ = load_model(str(allowed / "weights"), dtype=None, allowed_roots=[allowed, outside])
    assert model is not None


def test_the_artifact_holds_regular_files_the_save_wrote(dirs, tmp_path):
    """A template inside the allowed directory is saved by its contents, never as a link; the
    saved directory holds only what the save writes."""
    allowed, _ = dirs
    model, tokenizer = load_model(str(allowed / "clean"), dtype=None, allowed_roots=[allowed])
    out = save_pruned(model, tokenizer, tmp_path / "out", lambda dirs: {"note": "test"})
    entries = sorted(out.iterdir())
    assert all(p.is_file() and not p.is_symlink() for p in entries)
    assert {p.name for p in entries} <= {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
        "README.md",
        "sparsegpt_report.json",
    }
    assert (out / "chat_template.jinja").read_text() == "{{ bos_token }}"
