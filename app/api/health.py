"""GET /health: the database, Redis, and the workers seen recently.

Anyone (a load balancer, docker's healthcheck) gets the overall status only, 200 or 503; a
signed-in user (a token, the dashboard's session, single-user mode) also gets the details:
connection errors, workers with their pids and queues. /api/v1/health always needs sign-in."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app import streams
from app.schemas import ComponentHealth, HealthOut, WorkerOut

router = APIRouter(tags=["health"])


def _short(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


CHECK_TTL_S = 1.0  # a healthy verdict is reused this long per process; a failed one never is


def _database(request: Request) -> ComponentHealth:
    """One round trip on a pooled connection (no ORM session)."""
    try:
        with request.app.state.sessions.kw["bind"].connect() as connection:
            connection.exec_driver_sql("SELECT 1")
        return ComponentHealth(ok=True)
    except Exception as err:
        return ComponentHealth(ok=False, error=_short(err))


def _redis_and_workers(request: Request) -> tuple[ComponentHealth, list[dict]]:
    """Redis's health and the workers' registrations as stored (each with when it was seen)."""
    try:
        r = request.app.state.redis
        keys = list(r.scan_iter(match=streams.WORKER_PATTERN, count=500))  # also proves Redis answers
        return ComponentHealth(ok=True), [json.loads(raw) for raw in (r.mget(keys) if keys else []) if raw]
    except Exception as err:
        return ComponentHealth(ok=False, error=_short(err)), []


Checked = tuple[dict, dict, list[tuple[dict, object]]]  # the database, Redis, each worker and when it was seen


def _remembered(request: Request) -> Checked | None:
    cached = getattr(request.app.state, "health_checks", None)
    return cached[1] if cached is not None and cached[0] > time.monotonic() else None


def _checks(request: Request) -> Checked:
    """The database, Redis and the workers: checked again when the last healthy answer is older
    than CHECK_TTL_S (a load balancer's probe, or hundreds of them a second, costs a lookup),
    at once after any failure. So /health may report a component that failed less than
    CHECK_TTL_S ago as up, never the other way round. Each worker's fields are checked here
    (WorkerOut), once per check; a request adds only how long ago it was seen."""
    now = time.monotonic()
    database = _database(request)
    redis_ok, records = _redis_and_workers(request)
    workers = [
        (
            WorkerOut(
                name=info.get("name", "?"),
                queues=info.get("queues", []),
                gpu=info.get("gpu"),
                pid=info.get("pid"),
                seen_s_ago=0.0,
            ).model_dump(mode="json"),
            info.get("seen"),
        )
        for info in records
    ]
    workers.sort(key=lambda worker: worker[0]["name"])
    answer = (database.model_dump(mode="json"), redis_ok.model_dump(mode="json"), workers)
    request.app.state.health_checks = (now + CHECK_TTL_S, answer) if database.ok and redis_ok.ok else None
    return answer


@router.get(
    "/health", response_model=HealthOut, responses={503: {"model": HealthOut, "description": "database or Redis down"}}
)
async def health(request: Request) -> JSONResponse:
    """200 while the database and Redis answer ("degraded" when no worker was seen), else 503.
    Without sign-in (the public /health), only ``{"status": ...}``. Async: a remembered answer
    is read in the event loop; the checks themselves (blocking clients) run in the thread pool."""
    database, redis_ok, workers = _remembered(request) or await run_in_threadpool(_checks, request)
    if not (database["ok"] and redis_ok["ok"]):
        overall = "down"
    else:
        overall = "ok" if workers else "degraded"
    code = 503 if overall == "down" else 200
    if getattr(request.state, "user", None) is None:
        return JSONResponse({"status": overall}, status_code=code)
    now = time.time()
    seen = [
        {**fields, "seen_s_ago": round(max(0.0, now - (at if at is not None else now)), 1)} for fields, at in workers
    ]
    return JSONResponse({"status": overall, "database": database, "redis": redis_ok, "workers": seen}, status_code=code)
