"""Checkpoints fetched from the shared store are checked against the database (issue 22, item 2).

The store is shared, so it is not trusted: a planted block file became a user's pruned weights, and
a ``state.json`` naming an absolute path made a worker upload one of its own files and delete it.
Now the names are fixed patterns, the job's row holds the sha256 of each mirrored file (written as
the blocks finish, before the state goes up), and a fetched commit that does not match is discarded
(the engine starts at block 0). Real S3 (moto_server), a real database, the worker's own mirror.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from app import db
from app.config import Settings
from app.job_files import JobFiles
from app.models import Job
from tests.support.cluster import s3_bucket
from worker import checkpoint_sync
from worker.engine.resume import Checkpoints

BUCKET = "trust"


@pytest.fixture
def machines(tmp_path, monkeypatch):
    """Settings of three machines sharing one store and one database, and a job."""
    with s3_bucket(tmp_path / "s3", BUCKET) as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        database = f"sqlite:///{tmp_path / 'db.sqlite'}"

        def machine(name: str) -> Settings:
            return Settings(
                _env_file=None,
                data_dir=str(tmp_path / name),
                database_url=database,
                storage_url=f"s3://{BUCKET}/c",
                heartbeat_interval_s=0.5,
            )

        settings = [machine(f"m{i}") for i in range(3)]
        db.migrate(database)
        with db.session_scope(database) as session:
            job = Job(spec={"model": "a/b"}, model="a/b", method="sparsegpt", sparsity="2:4")
            session.add(job)
            session.flush()
            job_id = job.id
        yield server, settings, job_id


def commit(files: JobFiles, state: dict, contents: dict[str, bytes]) -> None:
    files.resume.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        (files.resume / name).write_bytes(data)
    (files.resume / "state.json").write_text(json.dumps(state))


STATE = {"fingerprint": {}, "blocks": [0], "hidden": "hidden-00001.safetensors", "next_block": 1, "results": []}
BLOCKS = {"block-00000.safetensors": b"pruned block 0", "hidden-00001.safetensors": b"inputs of block 1"}


def first_machine_pushes(settings, job_id) -> None:
    files = JobFiles(settings, job_id)
    commit(files, STATE, BLOCKS)
    assert checkpoint_sync.for_job(settings, files).push()


def test_a_recorded_checkpoint_is_taken_up_on_another_machine(machines):
    _, (one, two, _), job_id = machines
    first_machine_pushes(one, job_id)
    with db.session_scope(one.database) as session:
        recorded = session.get(Job, job_id).checkpoint_files
    assert sorted(recorded) == ["block-00000.safetensors", "hidden-00001.safetensors", "state.json"]
    files = JobFiles(two, job_id)
    assert checkpoint_sync.for_job(two, files).pull() == 3
    assert (files.resume / "block-00000.safetensors").read_bytes() == b"pruned block 0"
    assert json.loads((files.resume / "state.json").read_text()) == STATE


@pytest.mark.parametrize("planted", ["block-00000.safetensors", "state.json"])
def test_a_planted_file_discards_the_checkpoint(machines, caplog, planted):
    server, (one, two, _), job_id = machines
    first_machine_pushes(one, job_id)
    body = json.dumps({**STATE, "next_block": 5}).encode() if planted == "state.json" else b"someone's weights"
    server.client().put_object(Bucket=BUCKET, Key=f"c/checkpoints/{job_id}/{planted}", Body=body)
    files = JobFiles(two, job_id)
    with caplog.at_level(logging.WARNING):
        assert checkpoint_sync.for_job(two, files).pull() == 0
    assert "starting from block 0" in caplog.text and planted in caplog.text
    assert not files.resume.exists() or list(files.resume.iterdir()) == []


def test_a_checkpoint_the_database_never_recorded_is_not_fetched(machines, caplog):
    server, (_, two, _), job_id = machines
    for name, data in {**BLOCKS, "state.json": json.dumps(STATE).encode()}.items():
        server.client().put_object(Bucket=BUCKET, Key=f"c/checkpoints/{job_id}/{name}", Body=data)
    files = JobFiles(two, job_id)
    with caplog.at_level(logging.WARNING):
        assert checkpoint_sync.for_job(two, files).pull() == 0
    assert "no record" in caplog.text
    assert not (files.resume / "state.json").exists()


def test_a_state_naming_a_path_is_never_sent_nor_deleted(machines, tmp_path):
    server, (one, _, _), job_id = machines
    secret = tmp_path / "secret.txt"
    secret.write_text("the worker's own file")
    files = JobFiles(one, job_id)
    commit(files, {**STATE, "hidden": str(secret)}, BLOCKS)
    with pytest.raises(ValueError):
        checkpoint_sync.committed(json.loads((files.resume / "state.json").read_text()))
    assert checkpoint_sync.for_job(one, files).push()
    assert server.keys(BUCKET) == [] and secret.read_text() == "the worker's own file"


@pytest.mark.parametrize("hidden", ["/etc/passwd", "../state.json", "hidden-1.safetensors"])
def test_the_engine_starts_over_on_a_state_naming_other_files(tmp_path, hidden):
    directory = tmp_path / "resume"
    directory.mkdir()
    (directory / "state.json").write_text(json.dumps({**STATE, "fingerprint": {"f": 1}, "hidden": hidden}))
    checkpoints = Checkpoints(directory, {"f": 1})
    assert checkpoints.state is None and checkpoints.next_block == 0 and not directory.exists()
    assert torch.tensor(0) == 0
