"""cProfile of requests end to end in one process, through the real ASGI stack (the edge, auth,
the route, the service, the crud queries, serialization): what a request costs, by function.

    python -m benchmarks.profile_request [--requests 300] [--path /api/v1/jobs?limit=20] [--auth token|off]

The app is the real one (app.main.create_app, its lifespan run) on a scratch SQLite database
with 20 jobs (some finished, with a report of realistic size) and the Redis at REDIS_URL
(default redis://127.0.0.1:6379/13). Sync routes and dependencies run inline instead of in
the thread pool, so that the one profiler sees their work (the work itself is the same)."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _inline_threadpool() -> None:
    import anyio.to_thread

    async def run_sync(func, *args, abandon_on_cancel=False, cancellable=None, limiter=None):
        return func(*args)

    anyio.to_thread.run_sync = run_sync

    from app import db

    async def run_read(func, *args):
        return func(*args)

    db.run_read = run_read  # the listing's reader threads, inline too


def _report(blocks: int) -> dict:
    """A finished job's report about as large as a real one (per block and module rows)."""
    modules = [
        {"block": b, "name": f"self_attn.{m}", "sparsity": 0.5, "error": 0.01, "seconds": 0.2}
        for b in range(blocks)
        for m in ("q_proj", "k_proj", "v_proj", "o_proj", "up", "down", "gate")
    ]
    return {
        "modules": modules,
        "perplexity": {"wikitext2": {"dense": 12.3, "pruned": 14.1}},
        "environment": {"torch": "2.x", "gpu": "cpu"},
        "timings": {"total_s": 12.0},
    }


def seed(settings, jobs: int = 20) -> str:
    """The scratch database: one user (its token returned) and ``jobs`` jobs."""
    from app import crud, db
    from app.models import SUCCEEDED
    from app.tokens import hash_token, new_token

    db.migrate(settings.database)
    token = new_token()
    spec = {
        "model": "/models/llama",
        "method": "sparsegpt",
        "sparsity": 0.5,
        "calibration": {"dataset": "c4", "nsamples": 128, "seqlen": 2048},
    }
    with db.session_scope(settings.database) as session:
        user = crud.create_user(session, name="profiler", token_hash=hash_token(token), is_admin=True)
        for i in range(jobs):
            job = crud.create_job(session, spec=spec, owner_id=user.id)
            if i % 2:
                job.status, job.result = SUCCEEDED, _report(32)
    return token


async def drive(app, path: str, headers: dict, count: int) -> float:
    import httpx

    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000", headers=headers) as client:
            first = await client.get(path)
            if first.status_code != 200:
                raise SystemExit(f"{path}: {first.status_code} {first.text[:300]}")
            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.enable()
            for _ in range(count):
                await client.get(path)
            profiler.disable()
            elapsed = time.perf_counter() - start
    stats = pstats.Stats(profiler).strip_dirs().sort_stats("cumulative")
    stats.print_stats(45)
    stats.sort_stats("tottime").print_stats(25)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--path", default="/api/v1/jobs?limit=20")
    parser.add_argument("--auth", choices=("token", "off"), default="token")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    _inline_threadpool()
    from app.config import Settings
    from app.main import create_app

    data = Path(tempfile.mkdtemp(prefix="sparsegpt-profile-"))
    settings = Settings(
        data_dir=data,
        redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13"),
        auth="required" if args.auth == "token" else "off",
        sweep_interval_s=3600,
    )
    token = seed(settings)
    headers = {"Authorization": f"Bearer {token}"} if args.auth == "token" else {}
    elapsed = asyncio.run(drive(create_app(settings), args.path, headers, args.requests))
    print(
        f"{args.requests} x GET {args.path} (auth {args.auth}): {elapsed * 1000 / args.requests:.2f} ms a request "
        f"under the profiler"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
