"""The dashboard's Workers page (/workers): each live worker, its GPU, its current job, its last
heartbeat (the same view as GET /api/v1/workers)."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.api.workers import workers_view
from app.web.render import open_session, render

router = APIRouter(include_in_schema=False)


@router.get("/workers", response_class=HTMLResponse)
def workers_page(request: Request) -> HTMLResponse:
    error = None
    with open_session(request) as session:
        try:
            workers = workers_view(request.app.state.redis, session)
        except redis.RedisError as err:
            workers, error = [], f"Redis is unreachable ({err}): the workers cannot be listed."
        return render(request, "workers.html", {"workers": workers, "error": error})
