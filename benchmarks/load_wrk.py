"""`benchmarks/load.py --wrk`: requests/s and latency with wrk (Debian's package) against the real
API and, in the same run, a bare FastAPI app on the same uvicorn settings (h11, one process, the
same host) returning the same bytes. Targets (issue 22, "an API that keeps up"): GET /api/v1/jobs
with 20 jobs at least 0.3x the bare app's requests/s, /health at least 0.7x, and with 200 SSE
streams open the p99 of GET /api/v1/jobs at most 2x its p99 without them. Writes
benchmarks/results/load.json and prints the table; the targets are reported, not enforced."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "load.json"
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}

BARE_APP = """
import os, sys
from fastapi import FastAPI
from fastapi.responses import Response
import uvicorn
bodies = {p: open(f, "rb").read() for p, f in (("/api/v1/jobs", sys.argv[2]), ("/health", sys.argv[3]))}
app = FastAPI()
@app.get("/api/v1/jobs")
def jobs(limit: int = 20):
    return Response(bodies["/api/v1/jobs"], media_type="application/json")
@app.get("/health")
def health():
    return Response(bodies["/health"], media_type="application/json")
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="h11", log_level="warning", timeout_keep_alive=5)
"""


def wrk(url: str, *, connections: int, seconds: int) -> dict:
    """requests/s and p50/p99 in ms of one wrk run (2 threads)."""
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {q: float(v) * _UNITS[u] for q, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": lat.get("50"),
        "p99_ms": lat.get("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def open_streams(base: str, job_id: int, count: int, stop: threading.Event, answered: list) -> threading.Thread:
    """``count`` SSE connections to the job's events, held open until ``stop``; ``answered`` gets
    each stream's status code as it opens."""
    import asyncio

    opened = threading.Event()

    async def hold():
        limits = httpx.Limits(max_connections=count + 5)
        async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as client:

            async def one():
                async with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as resp:
                    answered.append(resp.status_code)
                    async for _ in resp.aiter_bytes():
                        if stop.is_set():
                            return

            tasks = [asyncio.create_task(one()) for _ in range(count)]
            await asyncio.sleep(3)
            opened.set()
            while not stop.is_set():
                await asyncio.sleep(0.2)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    thread = threading.Thread(target=lambda: asyncio.run(hold()), daemon=True)
    thread.start()
    opened.wait(30)
    return thread


def measure(base: str, models: Path, workdir: Path, seconds: int, connections: int) -> dict:
    from benchmarks.load import busy_job, free_port, small_job

    with httpx.Client(base_url=base, timeout=30) as c:
        running = c.post("/api/v1/jobs", json=busy_job(models)).json()["id"]
        for _ in range(19):
            assert c.post("/api/v1/jobs", json=small_job(models)).status_code in (200, 201, 202)
        listing, health = c.get("/api/v1/jobs?limit=20"), c.get("/health")
    (workdir / "jobs.json").write_bytes(listing.content)
    (workdir / "health.json").write_bytes(health.content)
    port = free_port()
    bare = subprocess.Popen(
        [sys.executable, "-c", BARE_APP, str(port), str(workdir / "jobs.json"), str(workdir / "health.json")],
        cwd=REPO,
        start_new_session=True,
    )
    bare_base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{bare_base}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        rows = {}
        for path in ("/api/v1/jobs?limit=20", "/health"):
            rows[path] = {
                "api": wrk(base + path, connections=connections, seconds=seconds),
                "bare": wrk(bare_base + path, connections=connections, seconds=seconds),
            }
        stop = threading.Event()
        answered: list[int] = []
        holder = open_streams(base, running, 200, stop, answered)
        try:
            during = wrk(base + "/api/v1/jobs?limit=20", connections=connections, seconds=seconds)
            during["sse_streams_open"] = sum(1 for code in answered if code == 200)
            rows["/api/v1/jobs?limit=20 with 200 SSE"] = {"api": during}
        finally:
            stop.set()
            holder.join(10)
    finally:
        bare.terminate()
        bare.wait(10)
    return rows


def report(rows: dict, seconds: int, connections: int) -> dict:
    jobs, health = rows["/api/v1/jobs?limit=20"], rows["/health"]
    sse = rows["/api/v1/jobs?limit=20 with 200 SSE"]["api"]
    targets = {
        "jobs_rps_ratio": {"value": jobs["api"]["rps"] / jobs["bare"]["rps"], "target": ">= 0.3"},
        "health_rps_ratio": {"value": health["api"]["rps"] / health["bare"]["rps"], "target": ">= 0.7"},
        "p99_ratio_with_200_sse": {"value": sse["p99_ms"] / jobs["api"]["p99_ms"], "target": "<= 2"},
    }
    targets["jobs_rps_ratio"]["met"] = targets["jobs_rps_ratio"]["value"] >= 0.3
    targets["health_rps_ratio"]["met"] = targets["health_rps_ratio"]["value"] >= 0.7
    targets["p99_ratio_with_200_sse"]["met"] = targets["p99_ratio_with_200_sse"]["value"] <= 2
    result = {
        "tool": "wrk -t2 --latency",
        "connections": connections,
        "seconds": seconds,
        "cpus": os.cpu_count(),
        "rows": rows,
        "targets": targets,
    }
    print(f"{'request':42} {'server':6} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'non-2xx':>8}")
    for path, by in rows.items():
        for who, r in by.items():
            print(f"{path:42} {who:6} {r['rps']:9.1f} {r['p50_ms']:9.1f} {r['p99_ms']:9.1f} {r['non_2xx']:8d}")
    print(f"SSE streams answered 200 and held: {sse.get('sse_streams_open')}")
    for name, t in targets.items():
        print(f"{name:28} {t['value']:6.2f} (target {t['target']}): {'met' if t['met'] else 'MISSED'}")
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_wrk(seconds: int = 10, connections: int = 50) -> int:
    import tempfile

    from benchmarks.load import start_server, stop_server

    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="sparsegpt-wrk-"))
    proc, base, models = start_server(workdir)
    try:
        report(measure(base, models, workdir, seconds, connections), seconds, connections)
        return 0
    finally:
        stop_server(proc, workdir)
