"""``sparsegpt pull JOB_ID [DIR]``: fetch a job's pruned model from a server, resuming a partial
download (HTTP Range), checking the archive's sha256 against the job's, and unpacking it.
``--format NAME`` fetches another of the job's artifact formats (the job's ``artifacts`` list);
a tar is unpacked, any other file is put in DIR as it is.

The server is ``--server`` or ``SPARSEGPT_URL`` (default http://127.0.0.1:8000); the token is
``SPARSEGPT_TOKEN`` (none is needed in single-user mode on loopback). The archive is kept as
``DIR.tar.part`` until its sha256 matches, so an interrupted pull continues where it stopped.
No torch here: a pull answers at once.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

PROG = "sparsegpt pull"
DEFAULT_SERVER = "http://127.0.0.1:8000"
CHUNK = 1024 * 1024
TAR = "application/x-tar"


class PullError(Exception):
    """One line for the user; the command exits 1."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pull", aliases=["download"], help="download a job's pruned model (resumable, sha256-checked) and unpack it"
    )
    p.add_argument("job_id", type=int, metavar="JOB_ID", help="the job's id")
    p.add_argument("directory", nargs="?", metavar="DIR", help="where to unpack it (default ./sparsegpt-job-JOB_ID)")
    p.add_argument(
        "--server",
        default=None,
        help=f"the service's URL (default $SPARSEGPT_URL or {DEFAULT_SERVER}); the token is $SPARSEGPT_TOKEN",
    )
    p.add_argument(
        "--format",
        default=None,
        metavar="NAME",
        help="which of the job's artifact formats to fetch (default: the job's own: compressed-tensors "
        "for a job that quantizes, else hf-tar)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    server = (args.server or os.environ.get("SPARSEGPT_URL") or DEFAULT_SERVER).rstrip("/")
    token = os.environ.get("SPARSEGPT_TOKEN") or None
    target = Path(args.directory or f"sparsegpt-job-{args.job_id}").expanduser()
    try:
        if args.job_id < 1:
            raise PullError(f"JOB_ID must be a positive job id, got {args.job_id}")
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise PullError(f"{str(target)!r} exists and is not an empty directory; name another DIR")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        import httpx  # here, so that building the CLI's parser loads nothing

        with httpx.Client(base_url=server, headers=headers, timeout=httpx.Timeout(30, connect=10)) as client:
            artifact = _artifact_of(client, server, args.job_id, args.format)
            tar = artifact.get("media_type", TAR) == TAR
            part = target.with_name(f"{target.name}.{'tar' if tar else artifact['format']}.part")
            target.parent.mkdir(parents=True, exist_ok=True)
            _download(client, artifact, part, args.job_id, quiet=args.quiet)
        if tar:
            _unpack(part, target, int(artifact["size"]))
            part.unlink()
        else:
            _place(part, target, artifact.get("file_name") or f"sparsegpt-job-{args.job_id}.{artifact['format']}")
    except PullError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (run it again to resume the download)", file=sys.stderr)
        return 130
    done = "unpacked into" if tar else "saved in"
    print(f"job {args.job_id}: {artifact['size'] / 1e6:.1f} MB, sha256 {artifact['sha256']} verified; {done} {target}")
    return 0


def _get(client: httpx.Client, server: str, path: str, **kwargs) -> httpx.Response:
    import httpx

    try:
        return client.get(path, **kwargs)
    except httpx.HTTPError as exc:
        raise PullError(
            f"cannot reach {server} ({type(exc).__name__}: {exc}); is the service running? "
            "(--server URL or SPARSEGPT_URL)"
        ) from None


def _refusal(response: httpx.Response, job_id: int) -> PullError:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    detail = detail if isinstance(detail, str) else response.reason_phrase
    if response.status_code == 401:
        return PullError(
            f"the server wants a token: set SPARSEGPT_TOKEN (`sparsegpt users token NAME` prints one) ({detail})"
        )
    if response.status_code == 404:
        return PullError(f"job {job_id} does not exist on this server")
    return PullError(f"job {job_id}: {response.status_code} {detail}")


def _artifact_of(client: httpx.Client, server: str, job_id: int, fmt: str | None = None) -> dict:
    """The job's artifact entry: the default one, or the one in format ``fmt``."""
    response = _get(client, server, f"/api/v1/jobs/{job_id}")
    if response.status_code != 200:
        raise _refusal(response, job_id)
    job = response.json()
    if not job.get("artifact"):
        state = job.get("status")
        why = {"succeeded": "its artifact is no longer on the server"}.get(
            state, f"it is {state}; its model exists once it has succeeded"
        )
        raise PullError(f"job {job_id} has no model to download: {why}")
    if fmt is None:
        return job["artifact"]
    listed = job.get("artifacts") or []
    for entry in listed:
        if entry.get("format") == fmt:
            return entry
    made = ", ".join(str(e.get("format")) for e in listed) or "none listed"
    raise PullError(f"job {job_id} has no artifact in the format {fmt!r} (it has: {made}); name one with --format")


def _download(client: httpx.Client, artifact: dict, part: Path, job_id: int, *, quiet: bool) -> None:
    """``part`` ends holding the whole archive with the job's sha256 (resumed when it has a prefix)."""
    import httpx

    size, expected = int(artifact["size"]), artifact["sha256"]
    have = part.stat().st_size if part.is_file() else 0
    if have > size:
        part.unlink()
        have = 0
    if have < size:
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{expected}"'} if have else {}
        with client.stream("GET", artifact["url"], headers=headers, timeout=httpx.Timeout(60, connect=10)) as response:
            if response.status_code not in (200, 206):
                response.read()
                raise _refusal(response, job_id)
            if response.status_code == 200:
                have = 0  # the server sent it all: start over
            elif not quiet:
                print(f"resuming at byte {have} of {size}", file=sys.stderr)
            try:
                with part.open("r+b" if have else "wb") as out:
                    out.seek(have)
                    out.truncate()
                    shown = -1
                    for chunk in response.iter_bytes(CHUNK):
                        out.write(chunk)
                        have += len(chunk)
                        tenth = have * 10 // max(size, 1)
                        if not quiet and tenth != shown:
                            shown = tenth
                            print(f"downloaded {have / 1e6:.1f} of {size / 1e6:.1f} MB", file=sys.stderr)
            except httpx.HTTPError as exc:
                raise PullError(
                    f"the download stopped at byte {have} of {size} ({type(exc).__name__}); "
                    "run the same command again to resume"
                ) from None
    sha = hashlib.sha256()
    with part.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            sha.update(chunk)
    if part.stat().st_size != size or sha.hexdigest() != expected:
        part.unlink()
        raise PullError(
            f"the archive's sha256 {sha.hexdigest()} is not the job's {expected}; "
            "the partial file was removed: run the same command again"
        )


def _place(part: Path, target: Path, name: str) -> None:
    """A file that is not a tar goes into ``target`` (made if needed) under the server's name for it."""
    name = Path(name).name  # a name, never a path
    try:
        target.mkdir(parents=True, exist_ok=True)
        os.replace(part, target / name)
    except OSError as exc:
        raise PullError(f"cannot put the file into {target}: {exc}") from None


def _unpack(archive: Path, target: Path, size: int) -> None:
    """The archive's one top directory becomes ``target``. The server writes regular files and
    directories only: any other member (a link, a device, a FIFO) is refused before anything is
    written, as is a compressed archive (opened as plain tar: a small gzip could unpack to gigabytes)
    and members whose sizes add up to more than the archive's announced ``size``."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with tarfile.open(archive, "r:") as tar:
            members = tar.getmembers()
            _check_members(members, size)
            tops = {Path(m.name).parts[0] for m in members}
            if len(tops) != 1:
                raise PullError(f"the archive holds {len(tops)} top directories, not one")
            tar.extractall(staging, members=members, filter="data")
        top = staging / tops.pop()
        if target.exists():
            target.rmdir()  # empty, checked before
        shutil.move(str(top), str(target))
    except tarfile.ReadError:
        raise PullError("the downloaded file is not a plain tar archive; it was not unpacked") from None
    except (tarfile.TarError, OSError) as exc:
        raise PullError(f"cannot unpack the archive into {target}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_members(members: list[tarfile.TarInfo], size: int) -> None:
    """Regular files and directories with plain relative names, no more bytes than announced."""
    total = 0
    for member in members:
        if not (member.isreg() or member.isdir()):
            raise PullError(
                f"the archive holds {member.name!r}, which is not a regular file or a directory "
                "(the server writes none); nothing was unpacked"
            )
        parts = Path(member.name).parts
        if not parts or member.name.startswith("/") or any(p in (".", "..") for p in parts):
            raise PullError(f"the archive holds the path {member.name!r}; nothing was unpacked")
        total += member.size
        if total > size:
            raise PullError(
                f"the archive's members hold more than the archive's announced {size} bytes; nothing was unpacked"
            )
