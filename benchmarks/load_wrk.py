"""`benchmarks/load.py --wrk`: requests/s and latency with wrk (Debian's package) against the real
API and, in the same run, a bare FastAPI app on the same uvicorn settings (h11, the same number of
processes on one listening socket, the same host) returning the same bytes. Targets (issue 22, "an
API that keeps up"): GET /api/v1/jobs with 20 jobs at least 0.3x the bare app's requests/s,
/health at least 0.7x, and with 200 SSE streams open the p99 of GET /api/v1/jobs at most 2x its
p99 without them.

The machine is shared, so each figure is a ratio taken within one round (the API and the bare app
measured back to back, the order alternating round by round), over ``rounds`` rounds: the report
gives each round's ratio, their min/median/max and the load average while they ran. Beside
requests/s it gives each server's CPU time per request (its processes' user+system time over the
requests wrk completed), which other programs on the machine disturb far less. The measurement
starts once the long job is running. Writes benchmarks/results/load.json and prints the table; the
targets are reported, not enforced."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
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
import os, signal, socket, sys
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
port, processes = int(sys.argv[1]), int(sys.argv[4])
settings = dict(host="127.0.0.1", port=port, http="h11", log_level="warning", timeout_keep_alive=5)
if processes == 1:
    uvicorn.run(app, **settings)
    sys.exit(0)
# as `sparsegpt serve --api-workers N` does: one socket bound here, N forked processes accept on it
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # as serve_procs.bind: TCP_NODELAY
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", port))
sock.listen(2048)
children = []
for _ in range(processes):
    pid = os.fork()
    if pid == 0:
        uvicorn.Server(uvicorn.Config(app, **settings)).run(sockets=[sock])
        os._exit(0)
    children.append(pid)
signal.signal(signal.SIGTERM, lambda *_: [os.kill(c, signal.SIGTERM) for c in children])
for _ in children:
    os.wait()
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


def _cpu_s(processes: list) -> float:
    """User + system CPU seconds of these processes (psutil.Process), so far."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except Exception:  # a process gone: its time is not counted
            pass
    return total


def server_processes(pid: int, api_workers: int) -> list:
    """The processes that answer HTTP: ``pid`` itself with one, else its forked copies (the same
    command line: not the local workers or redis-server it also started)."""
    import psutil

    parent = psutil.Process(pid)
    if api_workers == 1:
        return [parent]
    return [child for child in parent.children() if child.cmdline() == parent.cmdline()]


def timed_wrk(url: str, processes: list, *, connections: int, seconds: int) -> dict:
    """One wrk run, with the load average when it began and the servers' CPU us per request."""
    load = os.getloadavg()[0]
    cpu = _cpu_s(processes)
    result = wrk(url, connections=connections, seconds=seconds)
    requests = max(1, round(result["rps"] * seconds))
    result["cpu_us_per_request"] = round((_cpu_s(processes) - cpu) / requests * 1e6)
    result["load_1m"] = round(load, 2)
    return result


def wait_running(client: httpx.Client, job_id: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "running":
            time.sleep(3)  # past its start (loading the model)
            return
        time.sleep(0.5)
    raise SystemExit(f"the long job {job_id} did not start in {timeout_s} s")


def measure(server_pid: int, base: str, models: Path, workdir: Path, opts: dict) -> dict:
    # Long on purpose: the whole measurement in order (jobs, the bare twin, alternating rounds, SSE).
    from benchmarks.load import busy_job, free_port, small_job

    seconds, connections, rounds, api_workers = (
        opts["seconds"],
        opts["connections"],
        opts["rounds"],
        opts["api_workers"],
    )
    with httpx.Client(base_url=base, timeout=30) as c:
        running = c.post("/api/v1/jobs", json=busy_job(models)).json()["id"]
        for _ in range(19):
            assert c.post("/api/v1/jobs", json=small_job(models)).status_code in (200, 201, 202)
        wait_running(c, running)
        listing, health = c.get("/api/v1/jobs?limit=20"), c.get("/health")
    (workdir / "jobs.json").write_bytes(listing.content)
    (workdir / "health.json").write_bytes(health.content)
    port = free_port()
    bare = subprocess.Popen(
        [sys.executable, "-c", BARE_APP, str(port), str(workdir / "jobs.json"), str(workdir / "health.json")]
        + [str(api_workers)],
        cwd=REPO,
        start_new_session=True,
    )
    bare_base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{bare_base}/health", timeout=1).content != health.content:
                    raise SystemExit("the bare app does not answer the same bytes")
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        time.sleep(1)  # every bare process listening
        sides = {
            "api": (base, server_processes(server_pid, api_workers)),
            "bare": (bare_base, server_processes(bare.pid, api_workers)),
        }
        rows: dict = {}
        for path in ("/api/v1/jobs?limit=20", "/health"):
            rows[path] = {"api": [], "bare": []}
            for number in range(rounds):
                for who in ("api", "bare") if number % 2 == 0 else ("bare", "api"):
                    url, processes = sides[who]
                    rows[path][who].append(timed_wrk(url + path, processes, connections=connections, seconds=seconds))
        rows[SSE] = {"api": [], "api without": []}
        for number in range(rounds):  # with and without the streams back to back, order alternating
            for streams in (True, False) if number % 2 == 0 else (False, True):
                rows[SSE]["api" if streams else "api without"].append(
                    _with_streams(base, running, sides["api"][1], connections, seconds, streams)
                )
    finally:
        bare.terminate()
        bare.wait(10)
    return rows


SSE = "/api/v1/jobs?limit=20 with 200 SSE"


def _with_streams(base: str, job_id: int, processes: list, connections: int, seconds: int, streams: bool) -> dict:
    """One wrk run of the jobs list, with 200 of the job's event streams held open or none."""
    if not streams:
        return timed_wrk(base + "/api/v1/jobs?limit=20", processes, connections=connections, seconds=seconds)
    stop = threading.Event()
    answered: list[int] = []
    holder = open_streams(base, job_id, 200, stop, answered)
    try:
        during = timed_wrk(base + "/api/v1/jobs?limit=20", processes, connections=connections, seconds=seconds)
        during["sse_streams_open"] = sum(1 for code in answered if code == 200)
        return during
    finally:
        stop.set()
        holder.join(10)
        time.sleep(1)  # the streams closed on the server too


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "each": values}


def report(rows: dict, opts: dict) -> dict:
    def ratios(path: str, key: str, invert: bool = False, other: str = "bare") -> dict:
        pairs = zip(rows[path]["api"], rows[path][other], strict=True)
        values = [(b[key] / a[key]) if invert else (a[key] / b[key]) for a, b in pairs]
        return _spread([round(v, 3) for v in values])

    jobs, health = "/api/v1/jobs?limit=20", "/health"
    held = [r.get("sse_streams_open", 0) for r in rows[SSE]["api"]]
    targets = {
        "jobs_rps_ratio": {**ratios(jobs, "rps"), "target": ">= 0.3"},
        "health_rps_ratio": {**ratios(health, "rps"), "target": ">= 0.7"},
        "p99_ratio_with_200_sse": {**ratios(SSE, "p99_ms", other="api without"), "target": "<= 2"},
    }
    targets["jobs_rps_ratio"]["met"] = targets["jobs_rps_ratio"]["median"] >= 0.3
    targets["health_rps_ratio"]["met"] = targets["health_rps_ratio"]["median"] >= 0.7
    targets["p99_ratio_with_200_sse"]["met"] = targets["p99_ratio_with_200_sse"]["median"] <= 2
    cpu = {path: ratios(path, "cpu_us_per_request", invert=True) for path in (jobs, health)}
    loads = [r["load_1m"] for by in rows.values() for runs in by.values() for r in runs]
    result = {
        "tool": "wrk -t2 --latency",
        **opts,
        "cpus": os.cpu_count(),
        "load_1m": {"min": min(loads), "max": max(loads)},
        "rows": rows,
        "targets": targets,
        "cpu_per_request_ratio_bare_over_api": cpu,
    }
    print(f"{'request':38} {'server':6} {'round':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10} load")
    for path, by in rows.items():
        for who, runs in by.items():
            for number, r in enumerate(runs, 1):
                print(
                    f"{path:38} {who:6} {number:5d} {r['rps']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
                    f"{r['cpu_us_per_request']:10d} {r['load_1m']:5.1f}"
                    + (f"  non-2xx {r['non_2xx']}" if r["non_2xx"] else "")
                )
    print(f"SSE streams answered 200 and held, per round: {held}; load average {min(loads)}-{max(loads)}")
    for name, t in targets.items():
        each = f" (rounds: {', '.join(f'{v:.2f}' for v in t['each'])}; min {t['min']:.2f})" if "each" in t else ""
        print(f"{name:24} median {t['median']:5.2f} (target {t['target']}): {'met' if t['met'] else 'MISSED'}{each}")
    for path, c in cpu.items():
        print(f"CPU per request, bare / API, {path}: median {c['median']:.2f} (min {c['min']:.2f}, max {c['max']:.2f})")
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_wrk(seconds: int = 8, connections: int = 50, rounds: int = 3, api_workers: int = 1) -> int:
    import tempfile

    from benchmarks.load import start_server, stop_server

    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="sparsegpt-wrk-"))
    proc, base, models = start_server(workdir, api_workers=api_workers)
    opts = {"connections": connections, "seconds": seconds, "rounds": rounds, "api_workers": api_workers}
    try:
        report(measure(proc.pid, base, models, workdir, opts), opts)
        return 0
    finally:
        stop_server(proc, workdir)
