"""GET /health: the database, Redis, and the workers seen recently.

Anyone (a load balancer, docker's healthcheck) gets the overall status only, 200 or 503; a
signed-in user (a token, the dashboard's session, single-user mode) also gets the details:
connection errors, workers with their pids and queues. /api/v1/health always needs sign-in."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app import streams
from app.schemas import ComponentHealth, HealthOut, HealthStatusOut, WorkerOut

router = APIRouter(tags=["health"])


def _short(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut, "description": "database or Redis down"}})
def health(request: Request) -> JSONResponse:
    """200 while the database and Redis answer ("degraded" when no worker was seen), else 503.
    Without sign-in (the public /health), only ``{"status": ...}``."""
    try:
        with request.app.state.sessions() as session:
            session.execute(text("SELECT 1"))
        database = ComponentHealth(ok=True)
    except Exception as err:
        database = ComponentHealth(ok=False, error=_short(err))
    workers: list[WorkerOut] = []
    try:
        r = request.app.state.redis
        r.ping()
        keys = list(r.scan_iter(match=streams.WORKER_PATTERN, count=500))
        now = time.time()
        for raw in r.mget(keys) if keys else []:
            if not raw:
                continue
            info = json.loads(raw)
            workers.append(
                WorkerOut(
                    name=info.get("name", "?"), queues=info.get("queues", []), gpu=info.get("gpu"),
                    pid=info.get("pid"), seen_s_ago=round(max(0.0, now - info.get("seen", now)), 1),
                )
            )
        redis_ok = ComponentHealth(ok=True)
    except Exception as err:
        redis_ok = ComponentHealth(ok=False, error=_short(err))
    workers.sort(key=lambda w: w.name)
    if not (database.ok and redis_ok.ok):
        overall = "down"
    else:
        overall = "ok" if workers else "degraded"
    code = 503 if overall == "down" else 200
    if getattr(request.state, "user", None) is None:
        return JSONResponse(HealthStatusOut(status=overall).model_dump(mode="json"), status_code=code)
    body = HealthOut(status=overall, database=database, redis=redis_ok, workers=workers)
    return JSONResponse(body.model_dump(mode="json"), status_code=code)
