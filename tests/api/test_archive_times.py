"""The artifact tar's members carry the job's save time (not 1970) and the stream stays reproducible."""

from __future__ import annotations

import io
import os
import tarfile

from app.archive import digest, iter_tar


def test_members_carry_the_save_time_and_the_stream_is_the_same_bytes_each_time(tmp_path):
    saved = 1_796_000_000  # 2026-11-30: the newest file's time is the job's save time
    (tmp_path / "sub").mkdir()
    for name, when in (("config.json", saved - 30), ("model.safetensors", saved - 10.7), ("sub/README.md", saved)):
        (tmp_path / name).write_bytes(os.urandom(700))
        os.utime(tmp_path / name, (when, when))
    data = b"".join(iter_tar(tmp_path, "sparsegpt-job-7"))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "sparsegpt-job-7/config.json",
        "sparsegpt-job-7/model.safetensors",
        "sparsegpt-job-7/sub/README.md",
    ]
    assert {m.mtime for m in members} == {saved}
    assert b"".join(iter_tar(tmp_path, "sparsegpt-job-7")) == data  # reproducible: the recorded sha256 holds
    size, _ = digest(tmp_path, "sparsegpt-job-7")
    assert size == len(data)
    assert b"".join(iter_tar(tmp_path, "sparsegpt-job-7", 1000, 2500)) == data[1000:2500]  # Range
