"""Load: N concurrent clients (default 50) posting and reading jobs while a job runs; prints
p50/p99 latencies per request kind.

    .venv/bin/python benchmarks/load.py                        # starts its own server (see below)
    .venv/bin/python benchmarks/load.py --url http://127.0.0.1:8000 --token sgpt_...

Only loopback addresses are accepted (this is not a tool to aim at other people's servers), and
the run is bounded: --clients <= 200, --rounds <= 200 per client, --duration <= 600 s.

Without --url it starts `sparsegpt serve --workers 1` on a free port of 127.0.0.1 with a data
directory of its own (SQLite, or DATABASE_URL when set; its own Redis unless REDIS_URL is set),
writes two tiny random models there, and queues one longer job that keeps the worker busy
through the measurement. Each client round: POST /jobs (a small job), GET /jobs/{id},
GET /jobs?limit=20, POST /jobs/{id}/cancel (so the queue does not grow without bound).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlparse

import httpx

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(workdir: Path, api_workers: int | None = None) -> tuple[subprocess.Popen, str, Path]:
    """`sparsegpt serve --workers 1` on a free port (``--api-workers`` when given), the models it
    may use, once it reports a worker."""
    sys.path.insert(0, str(REPO))
    from tests.support.tiny_models import make_tiny_model, sample_text

    models = workdir / "models"
    make_tiny_model(models / "llama")
    make_tiny_model(models / "llama-deep", blocks=8, hidden=128)
    (models / "calib.txt").write_text(sample_text(20_000), encoding="utf-8")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEGPT_")}
    env.update(
        SPARSEGPT_DATA_DIR=str(workdir / "data"),
        SPARSEGPT_LOCAL_DIRS=str(models),
        SPARSEGPT_WORKER_DEVICE="cpu",
        SPARSEGPT_MAX_ACTIVE_JOBS_PER_USER="0",
        SPARSEGPT_AUTH="off",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    log = (workdir / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--log-level",
            "warning",
        ]
        + (["--api-workers", str(api_workers)] if api_workers else []),
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{(workdir / 'serve.log').read_text()[-3000:]}")
        try:
            health = httpx.get(f"{base}/health", timeout=2).json()
            if health.get("workers"):
                return proc, base, models
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not become healthy in 120 s")


def small_job(models: Path | None) -> dict:
    if models is None:  # someone else's server: a hub id it need not download (the job is cancelled)
        return {
            "model": "facebook/opt-125m",
            "sparsity": 0.5,
            "calibration": {"nsamples": 4, "seqlen": 32},
            "evaluation": {"datasets": [], "max_windows": 2},
        }
    return {
        "model": str(models / "llama"),
        "sparsity": "2:4",
        "calibration": {"dataset": str(models / "calib.txt"), "nsamples": 4, "seqlen": 32},
        "evaluation": {"datasets": [str(models / "calib.txt")], "max_windows": 2},
        "dtype": "float32",
    }


def busy_job(models: Path) -> dict:
    return {
        "model": str(models / "llama-deep"),
        "sparsity": 0.5,
        "calibration": {"dataset": str(models / "calib.txt"), "nsamples": 512, "seqlen": 256},
        "evaluation": {"datasets": [str(models / "calib.txt")], "max_windows": 32},
        "dtype": "float32",
    }


async def client_loop(
    client: httpx.AsyncClient,
    models: Path | None,
    rounds: int,
    stop_at: float,
    latencies: dict[str, list[float]],
    codes: Counter,
) -> None:
    async def timed(kind: str, method: str, url: str, **kwargs) -> httpx.Response | None:
        start = time.perf_counter()
        try:
            response = await client.request(method, url, **kwargs)
        except httpx.HTTPError as err:
            codes[(kind, type(err).__name__)] += 1
            return None
        latencies[kind].append(time.perf_counter() - start)
        codes[(kind, response.status_code)] += 1
        return response

    for _ in range(rounds):
        if time.monotonic() > stop_at:
            return
        created = await timed("POST /jobs", "POST", "/api/v1/jobs", json=small_job(models))
        job_id = created.json().get("id") if created is not None and created.status_code == 201 else None
        if job_id is not None:
            await timed("GET /jobs/{id}", "GET", f"/api/v1/jobs/{job_id}")
        await timed("GET /jobs", "GET", "/api/v1/jobs", params={"limit": 20})
        if job_id is not None:
            await timed("POST /jobs/{id}/cancel", "POST", f"/api/v1/jobs/{job_id}/cancel")


async def run(base: str, token: str | None, models: Path | None, clients: int, rounds: int, duration: float) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60, limits=limits) as client:
        busy_id = None
        if models is not None:
            response = await client.post("/api/v1/jobs", json=busy_job(models))
            response.raise_for_status()
            busy_id = response.json()["id"]
            for _ in range(600):  # until it runs
                if (await client.get(f"/api/v1/jobs/{busy_id}")).json()["status"] != "queued":
                    break
                await asyncio.sleep(0.1)
        running = await client.get("/api/v1/jobs", params={"status": "running"})
        print(f"jobs running when the load starts: {running.json().get('total')}")
        latencies: dict[str, list[float]] = defaultdict(list)
        codes: Counter = Counter()
        start = time.monotonic()
        await asyncio.gather(
            *(client_loop(client, models, rounds, start + duration, latencies, codes) for _ in range(clients))
        )
        elapsed = time.monotonic() - start
        busy_status = (await client.get(f"/api/v1/jobs/{busy_id}")).json()["status"] if busy_id else "n/a"
        if busy_id is not None and busy_status in ("queued", "running"):
            await client.post(f"/api/v1/jobs/{busy_id}/cancel")

    total = sum(len(v) for v in latencies.values())
    print(
        f"\n{clients} clients, {total} requests in {elapsed:.1f} s ({total / elapsed:.0f} req/s); "
        f"the background job was {busy_status} at the end"
    )
    print(f"{'request':<24}{'n':>7}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    everything: list[float] = []
    for kind, values in latencies.items():
        everything += values
        print(
            f"{kind:<24}{len(values):>7}{percentile(values, 50) * 1000:>10.1f}{percentile(values, 99) * 1000:>10.1f}"
            f"{max(values) * 1000:>10.1f}"
        )
    if everything:
        print(
            f"{'all':<24}{len(everything):>7}{percentile(everything, 50) * 1000:>10.1f}"
            f"{percentile(everything, 99) * 1000:>10.1f}{max(everything) * 1000:>10.1f}"
            f"   (mean {statistics.mean(everything) * 1000:.1f})"
        )
    print("responses:", ", ".join(f"{k[0]} {k[1]}: {n}" for k, n in sorted(codes.items(), key=str)))
    bad = sum(n for (kind, code), n in codes.items() if not isinstance(code, int) or code >= 500)
    if bad:
        print(f"{bad} request(s) failed with 5xx or a transport error")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server on loopback (default: start one)")
    parser.add_argument("--token", default=os.environ.get("SPARSEGPT_TOKEN"), help="API token (or SPARSEGPT_TOKEN)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10, help="POST/GET/list/cancel rounds per client")
    parser.add_argument("--duration", type=float, default=120.0, help="stop after this many seconds")
    parser.add_argument(
        "--wrk",
        action="store_true",
        help="measure with wrk against a bare FastAPI app instead (benchmarks/load_wrk.py); each wrk run "
        "lasts --duration seconds (at most 30)",
    )
    parser.add_argument("--wrk-rounds", type=int, default=3, help="--wrk: API / bare rounds per request (1..10)")
    parser.add_argument(
        "--api-workers", type=int, help="the server's API processes (--wrk: the bare app's too; default: serve's)"
    )
    args = parser.parse_args(argv)
    if args.api_workers is not None and not 1 <= args.api_workers <= 8:
        parser.error("--api-workers: 1..8")
    if args.wrk:
        if not 1 <= args.wrk_rounds <= 10:
            parser.error("--wrk-rounds: 1..10")
        sys.path.insert(0, str(REPO))  # run as a script, benchmarks/ is on the path, not the repository
        from benchmarks.load_wrk import run_wrk

        seconds = max(1, min(int(args.duration), 30))
        return run_wrk(seconds=seconds, rounds=args.wrk_rounds, api_workers=args.api_workers or 1)
    if not (1 <= args.clients <= 200 and 1 <= args.rounds <= 200 and 0 < args.duration <= 600):
        parser.error("bounded on purpose: --clients 1..200, --rounds 1..200, --duration up to 600 s")
    proc = workdir = None
    models = None
    if args.url:
        host = urlparse(args.url).hostname
        if host not in LOOPBACK:
            parser.error(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}), not {host!r}")
        base = args.url.rstrip("/")
    else:
        workdir = Path(tempfile.mkdtemp(prefix="sparsegpt-load-"))
        print(f"starting a server in {workdir} ...")
        proc, base, models = start_server(workdir, api_workers=args.api_workers)
    try:
        code = asyncio.run(run(base, args.token, models, args.clients, args.rounds, args.duration))
        if code and workdir is not None:
            print(
                "the server's log ends with:\n"
                + "\n".join((workdir / "serve.log").read_text(errors="replace").splitlines()[-40:])
            )
        return code
    finally:
        if proc is not None:
            stop_server(proc, workdir)


def stop_server(proc: subprocess.Popen, workdir: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
