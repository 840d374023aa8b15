"""``sparsegpt serve --api-workers N``: N API processes on one socket, each with the edge limits
(a client that sends no request headers is cut after SPARSEGPT_HEADER_TIMEOUT_S), a killed one
replaced, and all of them gone after SIGTERM."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import time
from pathlib import Path

import httpx

from app.serve_procs import default_api_workers
from tests.support.processes import base_env, free_port, spawn, wait_for_health


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def test_several_api_processes_serve_with_the_edge_limits(team_pg, module_redis, tmp_path):
    env = base_env(
        SPARSEGPT_DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=team_pg,
        REDIS_URL=module_redis.url,
        SPARSEGPT_AUTH="off",
        SPARSEGPT_QUEUE=f"procs-{secrets.token_hex(3)}",
        SPARSEGPT_HEADER_TIMEOUT_S="1",
    )
    port = free_port()
    api = spawn(
        ["serve", "--workers", "0", "--api-workers", "3", "--port", str(port), "--log-level", "warning"],
        env,
        tmp_path / "api.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, api)
        procs = children(api.popen.pid)
        assert len(procs) == 3, (procs, api.tail())
        with httpx.Client(base_url=base, timeout=10) as c:
            assert all(c.get("/api/v1/jobs").status_code == 200 for _ in range(30))
        # Each process cuts a connection that sends no headers (the kernel spreads them over all three).
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
        time.sleep(2.5)
        for sock in silent:
            sock.settimeout(2)
            assert sock.recv(100) == b""  # closed by the server
            sock.close()
        os.kill(sorted(procs)[0], signal.SIGKILL)  # one dies: another takes its place
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(children(api.popen.pid) - {sorted(procs)[0]}) < 3:
            time.sleep(0.2)
        assert len(children(api.popen.pid)) == 3, api.tail()
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    finally:
        api.stop()
    assert api.popen.returncode == 0, api.tail()
    assert not children(api.popen.pid)


def test_default_api_workers():
    assert default_api_workers("sqlite:///x.db") == 1
    assert default_api_workers("postgresql+psycopg://u@h/db") == max(1, min(os.cpu_count() or 1, 8))
