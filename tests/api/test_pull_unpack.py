"""``sparsegpt pull`` unpacks regular files and directories only (issue 22, item 3).

The server's archive holds regular files in one top directory. Anything else is refused before a
byte is written: links (``x -> ../.ssh/id_rsa``, a top entry linking to ``.``), devices, FIFOs; a
compressed archive (read as plain tar: a small gzip could unpack to gigabytes); members whose sizes
add up to more than the archive announced.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from app.client import PullError, _unpack


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> int:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path.stat().st_size


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _entry(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, None


def test_regular_files_unpack(tmp_path):
    size = _tar(
        tmp_path / "a.tar",
        [_entry("job", tarfile.DIRTYPE), _file("job/config.json", b"{}"), _file("job/sub/w.bin", b"x" * 1000)],
    )
    _unpack(tmp_path / "a.tar", tmp_path / "out", size)
    assert (tmp_path / "out" / "config.json").read_bytes() == b"{}"
    assert (tmp_path / "out" / "sub" / "w.bin").stat().st_size == 1000


@pytest.mark.parametrize(
    "member",
    [
        _entry("job/x", tarfile.SYMTYPE, "../.ssh/id_rsa"),
        _entry("job/y", tarfile.SYMTYPE, "config.json"),  # inside, still a link: the server writes none
        _entry("job/h", tarfile.LNKTYPE, "job/config.json"),
        _entry("job/f", tarfile.FIFOTYPE),
        _entry("job/d", tarfile.CHRTYPE),
    ],
    ids=["link-out", "link-in", "hardlink", "fifo", "device"],
)
def test_every_other_member_type_is_refused_before_writing(tmp_path, member):
    size = _tar(tmp_path / "a.tar", [_file("job/config.json", b"{}"), member])
    with pytest.raises(PullError, match=repr(member[0].name)):
        _unpack(tmp_path / "a.tar", tmp_path / "out", size)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]


def test_a_top_entry_linking_to_dot_is_refused(tmp_path):
    size = _tar(tmp_path / "a.tar", [_entry("job", tarfile.SYMTYPE, "."), _file("job/config.json", b"{}")])
    with pytest.raises(PullError, match="'job'"):
        _unpack(tmp_path / "a.tar", tmp_path / "out", size)
    assert not (tmp_path / "out").exists()


def test_a_compressed_archive_is_not_unpacked(tmp_path):
    size = _tar(tmp_path / "a.tar.gz", [_file("job/zeros.bin", bytes(4_000_000))], mode="w:gz")
    assert size < 100_000
    with pytest.raises(PullError, match="not a plain tar"):
        _unpack(tmp_path / "a.tar.gz", tmp_path / "out", size)
    assert not (tmp_path / "out").exists()


def test_members_larger_than_the_announced_size_are_refused(tmp_path):
    size = _tar(tmp_path / "a.tar", [_file("job/w.bin", b"x" * 10_000)])
    with pytest.raises(PullError, match="more than the archive's announced"):
        _unpack(tmp_path / "a.tar", tmp_path / "out", 5_000)
    _unpack(tmp_path / "a.tar", tmp_path / "out", size)  # the announced size: fine
