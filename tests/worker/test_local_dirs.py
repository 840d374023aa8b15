"""SPARSEGPT_LOCAL_DIRS cannot be bypassed by a Hub-shaped id (issue 11, item 5).

transformers' ``from_pretrained("org/name")`` loads ``./org/name`` when such a directory exists
relative to the working directory. A worker started in a directory holding
``outside/secretmodel`` loaded that model for a job that named it as a Hub id, and its weights
became downloadable. Now the worker works in ``<data_dir>/worker-cwd`` (emptied at start), a Hub
id is never looked up on the disk, and a local model is an absolute path under the allowed
directories (symlinks resolved).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.config import Settings
from tests.support.paths import REPO
from tests.support.processes import Proc
from tests.support.stacks import SMALL
from worker.job_inputs import Refused, job_inputs

SECRET = "outside/secretmodel"


def start_worker_in(stack, name: str, cwd: Path) -> Proc:
    """``sparsegpt worker`` as ``tests.support.processes.spawn`` starts it, but from ``cwd``
    (spawn always starts in the repository)."""
    log = stack.logs / f"worker-{name}.log"
    with log.open("wb") as handle:
        popen = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", f"--hostname={name}@%h", "--loglevel=info"],
            cwd=cwd,
            env={**stack.env, "PYTHONPATH": str(REPO)},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc = Proc(popen, log)
    stack.workers.append(proc)  # stopped with the stack
    with stack.client() as client:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert popen.poll() is None, proc.tail()
            workers = client.get("/api/v1/health").json().get("workers", [])
            if any(w["name"].startswith(f"{name}@") and w["pid"] for w in workers):
                return proc
            time.sleep(0.2)
    raise AssertionError(f"worker {name} not seen:\n{proc.tail()}")


def job(models_dir: Path, model: str) -> dict:
    return {
        "model": model,
        "sparsity": "2:4",
        "dtype": "float32",
        "calibration": {"dataset": str(models_dir / "calib.txt"), **SMALL},
        "evaluation": {"datasets": []},
    }


@pytest.mark.slow
def test_a_hub_id_never_loads_a_directory_beside_the_worker(make_stack, redis_server, models_dir, tmp_path):
    start = tmp_path / "start"  # the directory the worker is started from
    shutil.copytree(models_dir / "llama", start / SECRET)
    stack = make_stack(redis_server.url)
    stack.start_api()
    worker = start_worker_in(stack, "cwd", start)

    with stack.client() as client:
        created = client.post("/api/v1/jobs", json=job(models_dir, SECRET))
        assert created.status_code == 201, created.text
        done = stack.wait(created.json()["id"], timeout=240)
        assert done["status"] == "failed", f"the model beside the worker was loaded: {done['status']}"
        # Offline (HF_HUB_OFFLINE=1), the Hub id is looked for in the Hub's cache only, which holds its
        # config.json and no weights (tests/support/hub_cache.py): it fails there, never from the directory.
        assert SECRET in done["error"] and "does not appear to have a file named" in done["error"], done
        assert "working directory" not in done["error"], "the worker ran a job outside its neutral directory"
        assert client.get(f"/api/v1/jobs/{done['id']}/artifact").status_code == 409

        allowed = client.post("/api/v1/jobs", json=job(models_dir, str(models_dir / "llama")))
        assert allowed.status_code == 201, allowed.text
        ok = stack.wait(allowed.json()["id"], timeout=240)
        assert ok["status"] == "succeeded", (ok, worker.tail())
    neutral = Path(stack.env["SPARSEGPT_DATA_DIR"]) / "worker-cwd"
    assert Path(f"/proc/{worker.popen.pid}/cwd").resolve() == neutral.resolve(), "the worker works in its own directory"
    assert list(neutral.iterdir()) == []


def test_a_hub_id_that_names_something_in_the_working_directory_is_refused(tmp_path, monkeypatch):
    """The worker's own check before the engine: should it ever run from another directory, a
    Hub id that exists there is refused, not loaded."""
    (tmp_path / "outside" / "secretmodel").mkdir(parents=True)
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", min_free_disk_mb=0, local_dirs="")
    monkeypatch.chdir(tmp_path)
    spec = {"model": SECRET, "sparsity": 0.5, "evaluation": {"datasets": []}}
    with pytest.raises(Refused, match="is a Hub id, yet the worker's working directory"):
        job_inputs(spec, settings)
    assert job_inputs({**spec, "model": "outside/other"}, settings).spec.model == "outside/other"


def test_local_paths_are_absolute_and_resolved_under_the_allowed_directories(tmp_path):
    allowed = tmp_path / "models"
    (allowed / "llama").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (allowed / "link").symlink_to(tmp_path / "secret")  # a symlink out of the allowed directory
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", min_free_disk_mb=0, local_dirs=str(allowed))
    spec = {"sparsity": 0.5, "evaluation": {"datasets": []}}
    assert job_inputs({**spec, "model": str(allowed / "llama")}, settings).spec.model == str(allowed / "llama")
    with pytest.raises(Refused, match="outside the server's allowed directories"):
        job_inputs({**spec, "model": str(allowed / "link")}, settings)
    from pydantic import ValidationError

    from worker.engine.contract.spec import JobSpec

    for relative in ("./models/llama", "../models/llama", "~/models/llama"):
        with pytest.raises(ValidationError, match="absolute path"):
            JobSpec.model_validate({**spec, "model": relative})


def test_the_neutral_directory_is_emptied_and_relative_settings_are_pinned(tmp_path, monkeypatch):
    """Leaving the start directory changes nothing else: relative SPARSEGPT_LOCAL_DIRS and a
    relative SQLite path keep naming what they named from the start directory."""
    from worker.celery_app import WORKER_CWD, prepare_neutral_cwd

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("SPARSEGPT_LOCAL_DIRS", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    leftover = tmp_path / "data" / WORKER_CWD / "outside" / "secretmodel"
    leftover.mkdir(parents=True)
    settings = Settings(
        _env_file=None, data_dir=tmp_path / "data", local_dirs="models:other", database_url="sqlite:///db/jobs.db"
    )
    path = prepare_neutral_cwd(settings)
    assert path == tmp_path / "data" / WORKER_CWD and list(path.iterdir()) == []
    os.chdir(path)
    assert settings.allowed_dirs == [tmp_path / "models", tmp_path / "other"]
    assert settings.database == f"sqlite:///{tmp_path / 'db' / 'jobs.db'}"
    assert os.environ["SPARSEGPT_LOCAL_DIRS"] == f"{tmp_path / 'models'}:{tmp_path / 'other'}"


def test_a_linked_neutral_directory_is_replaced_not_emptied(tmp_path, monkeypatch):
    """<data_dir>/worker-cwd as a symlink (planted, or a mistake): the link is replaced by an
    empty directory; what it pointed at keeps every file."""
    from worker.celery_app import WORKER_CWD, prepare_neutral_cwd

    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("SPARSEGPT_LOCAL_DIRS", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    precious = tmp_path / "models"
    (precious / "llama").mkdir(parents=True)
    (precious / "weights.bin").write_bytes(b"x")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / WORKER_CWD).symlink_to(precious)
    path = prepare_neutral_cwd(Settings(_env_file=None, data_dir=tmp_path / "data"))
    assert not path.is_symlink() and path.is_dir() and list(path.iterdir()) == []
    assert sorted(p.name for p in precious.iterdir()) == ["llama", "weights.bin"]
