"""Uploads on a team server, as real processes over real HTTP: the per-user quota and file count
(enforced while the body streams, and again when the file is kept, so two concurrent uploads
cannot both pass), DELETE by the owner or an admin (refused while a queued job names the set),
retention by the sweeper, the dashboard form's upload under the same caps, and .jsonl lines
nested too deeply for json.loads."""

from __future__ import annotations

import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import add_user, base_env
from tests.support.stacks import Stack, job_body

MAX_UPLOAD = 64 * 1024
QUOTA = 100 * 1024
MAX_FILES = 3


def make_team_stack(team_pg: str, redis_url: str, models_dir: Path, root: Path, **settings: str) -> Stack:
    """The API alone (no worker: jobs stay queued), team mode, TMPDIR of its own to watch."""
    (root / "tmp").mkdir(parents=True)
    env = base_env(
        SPARSEGPT_DATA_DIR=str(root / "data"),
        DATABASE_URL=team_pg,
        REDIS_URL=redis_url,
        SPARSEGPT_LOCAL_DIRS=str(models_dir),
        SPARSEGPT_QUEUE=f"uploads-{secrets.token_hex(3)}",
        SPARSEGPT_AUTH="required",
        SPARSEGPT_MIN_FREE_DISK_MB="1",
        TMPDIR=str(root / "tmp"),
        SPARSEGPT_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        SPARSEGPT_UPLOAD_QUOTA_BYTES_PER_USER=str(QUOTA),
        SPARSEGPT_MAX_UPLOADS_PER_USER=str(MAX_FILES),
    )
    env.update({f"SPARSEGPT_{k.upper()}": str(v) for k, v in settings.items()})
    (root / "logs").mkdir()
    stack = Stack(env, root / "logs")
    stack.token = add_user(env, f"root{secrets.token_hex(3)}", admin=True)
    stack.start_api()
    return stack


@pytest.fixture(scope="module")
def stack(team_pg, module_redis, models_dir, tmp_path_factory) -> Iterator[Stack]:
    stack = make_team_stack(team_pg, module_redis.url, models_dir, tmp_path_factory.mktemp("uploads"))
    yield stack
    stack.stop()


def user(stack: Stack, prefix: str) -> httpx.Client:
    return stack.client(add_user(stack.env, f"{prefix}{secrets.token_hex(3)}"))


def text(size: int) -> bytes:
    """``size`` bytes of distinct UTF-8 text (stored files are content-addressed)."""
    return ((secrets.token_hex(8) + " word ") * (size // 20 + 1)).encode()[:size]


def post_file(client: httpx.Client, content: bytes, name: str = "set.txt") -> httpx.Response:
    return client.post("/api/v1/calibration-sets", files={"file": (name, content, "text/plain")})


def stored(stack: Stack, item: dict) -> Path:
    return Path(stack.env["SPARSEGPT_DATA_DIR"]) / "uploads" / f"{item['sha256']}.{item['format']}"


def listed(client: httpx.Client) -> dict[int, dict]:
    response = client.get("/api/v1/calibration-sets")
    assert response.status_code == 200, response.text
    return {item["id"]: item for item in response.json()["items"]}


# --- quota and count ---------------------------------------------------------------------------


def test_quota_and_file_count_per_user(stack):
    alice, bob = user(stack, "alice"), user(stack, "bob")
    first = post_file(alice, text(60 * 1024))
    assert first.status_code == 201, first.text
    assert first.json()["owner"].startswith("alice")

    over = post_file(alice, text(50 * 1024))  # under the server's cap, over the 40 KiB left
    assert over.status_code == 413, over.text
    detail = over.json()["detail"]
    assert (
        "SPARSEGPT_UPLOAD_QUOTA_BYTES_PER_USER" in detail and str(QUOTA) in detail and str(QUOTA - 60 * 1024) in detail
    )

    for _ in range(MAX_FILES - 1):
        assert post_file(alice, text(1000)).status_code == 201
    full = post_file(alice, text(1000))
    assert full.status_code == 409, full.text
    assert "SPARSEGPT_MAX_UPLOADS_PER_USER" in full.json()["detail"] and str(MAX_FILES) in full.json()["detail"]
    mine = [i for i, item in listed(alice).items() if item["owner"] == first.json()["owner"]]
    assert len(mine) == MAX_FILES

    assert post_file(bob, text(60 * 1024)).status_code == 201  # alice's use is hers alone
    assert alice.delete(f"/api/v1/calibration-sets/{mine[0]}").status_code == 204
    assert post_file(alice, text(1000)).status_code == 201  # room again
    leftovers = [p.name for p in stored(stack, first.json()).parent.iterdir() if p.name.startswith(".upload-")]
    assert leftovers == []


def test_two_concurrent_uploads_cannot_both_pass_the_quota(stack):
    """Each fits the quota alone, both together do not: both bodies are half sent before either
    ends, so both pass the streaming cap; the count under the user's lock keeps one."""
    token = add_user(stack.env, f"carol{secrets.token_hex(3)}")
    barrier = threading.Barrier(2, timeout=30)
    results: list[httpx.Response] = []
    boundary = "concurrent-boundary"

    def body(content: bytes) -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.txt"\r\n'
            "Content-Type: text/plain\r\n\r\n"
        ).encode()
        yield content[: len(content) // 2]
        barrier.wait()
        time.sleep(0.5)  # both handlers are reading their bodies by now
        yield content[len(content) // 2 :]
        yield f"\r\n--{boundary}--\r\n".encode()

    def send() -> None:
        with stack.client(token) as client:
            results.append(
                client.post(
                    "/api/v1/calibration-sets",
                    content=body(text(60 * 1024)),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"},
                )
            )

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    codes = sorted(r.status_code for r in results)
    assert codes == [201, 413], [r.text for r in results]
    refused = next(r for r in results if r.status_code == 413)
    assert "SPARSEGPT_UPLOAD_QUOTA_BYTES_PER_USER" in refused.json()["detail"]
    kept = next(r for r in results if r.status_code == 201).json()
    with stack.client(token) as carol:
        assert [i for i in listed(carol).values() if i["owner"] == kept["owner"]] == [kept]
    assert not list(stored(stack, kept).parent.glob(".upload-*"))  # the refused one's temporary file


# --- DELETE ------------------------------------------------------------------------------------


def test_delete_by_owner_or_admin_refused_while_a_queued_job_uses_it(stack, models_dir):
    dave, erin = user(stack, "dave"), user(stack, "erin")
    admin = stack.client()
    content = text(2000)
    mine, twin, other = (
        post_file(dave, content).json(),
        post_file(erin, content).json(),
        post_file(dave, text(3000)).json(),
    )
    assert stored(stack, mine) == stored(stack, twin)  # the same content: one stored file

    assert erin.delete(f"/api/v1/calibration-sets/{mine['id']}").status_code == 403
    assert dave.delete("/api/v1/calibration-sets/999999").status_code == 404
    assert dave.delete("/api/v1/calibration-sets/0").status_code == 422

    # A queued job (no worker) names one set for calibration, another for evaluation.
    spec = job_body(
        models_dir,
        calibration={"dataset": f"upload:{mine['id']}", "nsamples": 4, "seqlen": 32},
        evaluation={"datasets": [f"upload:{other['id']}"], "max_windows": 2},
    )
    job = dave.post("/api/v1/jobs", json=spec)
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    for item in (mine, other):
        refused = dave.delete(f"/api/v1/calibration-sets/{item['id']}")
        assert refused.status_code == 409 and str(job_id) in refused.json()["detail"], refused.text
    assert stored(stack, mine).is_file() and stored(stack, other).is_file()

    assert dave.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
    assert dave.delete(f"/api/v1/calibration-sets/{mine['id']}").status_code == 204
    assert stored(stack, twin).is_file()  # erin's set holds the same file
    assert admin.delete(f"/api/v1/calibration-sets/{twin['id']}").status_code == 204  # an admin may
    assert not stored(stack, mine).exists()
    assert dave.delete(f"/api/v1/calibration-sets/{other['id']}").status_code == 204
    assert not stored(stack, other).exists()
    assert dave.delete(f"/api/v1/calibration-sets/{other['id']}").status_code == 404
    assert not {mine["id"], twin["id"], other["id"]} & set(listed(dave))
    resubmitted = dave.post("/api/v1/jobs", json=spec)
    assert resubmitted.status_code == 422 and "no such calibration set" in resubmitted.text


# --- retention -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sweeper_deletes_old_uploads_unless_a_queued_job_uses_them(team_pg, redis_server, models_dir, tmp_path):
    stack = make_team_stack(
        team_pg, redis_server.url, models_dir, tmp_path, upload_retention_s="4", sweep_interval_s="0.5"
    )
    try:
        client = stack.client()
        used, evaluated, unused = (post_file(client, text(1500)).json() for _ in range(3))
        spec = job_body(
            models_dir,
            calibration={"dataset": f"upload:{used['id']}", "nsamples": 4, "seqlen": 32},
            evaluation={"datasets": [f"upload:{evaluated['id']}"], "max_windows": 2},
        )
        job = client.post("/api/v1/jobs", json=spec)
        assert job.status_code == 201, job.text

        deadline = time.monotonic() + 30
        while unused["id"] in listed(client) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert unused["id"] not in listed(client) and not stored(stack, unused).exists()
        time.sleep(1.5)  # a few more rounds: the job's sets stay while it is queued
        assert {used["id"], evaluated["id"]} <= set(listed(client))
        assert stored(stack, used).is_file() and stored(stack, evaluated).is_file()

        assert client.post(f"/api/v1/jobs/{job.json()['id']}/cancel").status_code == 200
        deadline = time.monotonic() + 30
        while {used["id"], evaluated["id"]} & set(listed(client)) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not {used["id"], evaluated["id"]} & set(listed(client))
        assert not stored(stack, used).exists() and not stored(stack, evaluated).exists()
    finally:
        stack.stop()


# --- the dashboard's form: the same caps, while it streams ---------------------------------------


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def largest_open_file(pids: list[int], roots: list[Path]) -> int:
    """The largest regular file under ``roots`` that one of ``pids`` holds open."""
    largest = 0
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
                if any(target.startswith(str(root)) for root in roots):
                    largest = max(largest, os.stat(target).st_size)
            except OSError:
                pass
    return largest


def tree_size(roots: list[Path]) -> int:
    total = 0
    for root in roots:
        for path in root.rglob("*"):
            try:
                total += path.stat().st_size if path.is_file() else 0
            except OSError:
                pass
    return total


def chunked_form(
    stack: Stack,
    token: str,
    *,
    file_bytes: int,
    watch: list[Path],
    path: str = "/jobs/new",
    field: str = "calibration_file",
) -> dict:
    """POST a multipart form with Transfer-Encoding: chunked (no Content-Length) over a raw
    socket, stopping as soon as the server answers; samples what the API holds on disk."""
    boundary = "form-boundary-" + secrets.token_hex(4)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="calibration_source"\r\n\r\nfile\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="huge.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n"
    ).encode()
    pids = process_tree(stack.api.popen.pid)
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
    sock.sendall(
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{stack.port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
    )

    def chunk(data: bytes) -> None:
        sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    sent, largest, on_disk, started = 0, 0, 0, time.monotonic()
    piece = b"0123456789abcdef" * 4096  # 64 KiB
    chunk(head)
    answered = False
    try:
        while sent < file_bytes and time.monotonic() - started < 60:
            if select.select([sock], [], [], 0)[0]:
                answered = True
                break
            chunk(piece)
            sent += len(piece)
            if sent % (16 * len(piece)) == 0:
                largest = max(largest, largest_open_file(pids, watch))
                on_disk = max(on_disk, tree_size(watch))
        if not answered:
            chunk(f"\r\n--{boundary}--\r\n".encode())
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while we were still sending
    reply = b""
    try:
        while b"</html>" not in reply.lower() and len(reply) < 1_000_000:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    except (TimeoutError, ConnectionResetError):
        pass
    seconds = time.monotonic() - started
    sock.close()
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None
    return {
        "status": status,
        "text": reply.decode("utf-8", "replace"),
        "sent": sent,
        "seconds": seconds,
        "largest_open": max(largest, largest_open_file(pids, watch)),
        "on_disk": max(on_disk, tree_size(watch)),
    }


def test_form_upload_streams_under_the_server_cap_chunked(stack):
    """A chunked form far over the cap is answered 413 long before its end, with nothing over
    the cap ever on disk (the API's TMPDIR and data directory)."""
    token = add_user(stack.env, f"frank{secrets.token_hex(3)}")
    data, tmp = Path(stack.env["SPARSEGPT_DATA_DIR"]), Path(stack.env["TMPDIR"])
    before = tree_size([data, tmp])
    result = chunked_form(stack, token, file_bytes=100 * 1024 * 1024, watch=[data, tmp])
    assert result["status"] == 413, result["text"][-2000:]
    assert "SPARSEGPT_MAX_UPLOAD_BYTES" in result["text"] and str(MAX_UPLOAD) in result["text"]
    assert result["sent"] < 40 * 1024 * 1024 and result["seconds"] < 20, result
    assert result["largest_open"] <= MAX_UPLOAD + 64 * 1024, result
    assert result["on_disk"] - before <= MAX_UPLOAD + 1024 * 1024, result
    assert not [p for p in (data / "uploads").glob(".upload-*")]


def test_form_upload_counts_against_the_quota(stack):
    """The form's file is capped by the user's quota left, as the API's upload is."""
    token = add_user(stack.env, f"gina{secrets.token_hex(3)}")
    with stack.client(token) as gina:
        assert post_file(gina, text(60 * 1024)).status_code == 201
    data = Path(stack.env["SPARSEGPT_DATA_DIR"])
    result = chunked_form(stack, token, file_bytes=50 * 1024, watch=[data])  # under the cap, over the 40 KiB left
    assert result["status"] == 413, result["text"][-2000:]
    assert "SPARSEGPT_UPLOAD_QUOTA_BYTES_PER_USER" in result["text"]


# --- content --------------------------------------------------------------------------------------


@pytest.mark.parametrize("line", ["[" * 60_000, '{"text": "a", "meta": ' + '{"a": ' * 8000 + "1" + "}" * 8001])
def test_deeply_nested_jsonl_is_422(stack, line):
    harry = user(stack, "harry")
    content = ('{"text": "a fine line"}\n' + line + "\n").encode()
    response = post_file(harry, content, name="nested.jsonl")
    assert response.status_code == 422, response.text
    assert "line 2" in response.json()["detail"] and "nested too deeply" in response.json()["detail"]
    assert harry.get("/api/v1/me").status_code == 200  # the server is fine
