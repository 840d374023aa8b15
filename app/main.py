"""The FastAPI app factory: ``uvicorn --factory app.main:create_app``.

Everything the routes need (settings, the database session factory, Redis clients) lives on
``app.state``, so one process can hold apps for different databases (the tests do).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import redis
import redis.asyncio as aredis
from fastapi import FastAPI

from app import dashboard, db
from app.api import calibration, events, health, jobs
from app.config import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, migrate: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if migrate:
            db.migrate(settings.database)  # alembic upgrade head
        app.state.sessions = db.session_factory(settings.database)
        app.state.redis = redis.Redis.from_url(settings.redis, decode_responses=True, health_check_interval=30)
        app.state.aredis = aredis.Redis.from_url(settings.redis, decode_responses=True, health_check_interval=30)
        try:
            yield
        finally:
            await app.state.aredis.aclose()
            app.state.redis.close()

    app = FastAPI(
        title="sparsegpt-service",
        version="0.1.0",
        summary="Queue one-shot SparseGPT / Wanda / magnitude pruning jobs on shared GPUs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    for router in (jobs.router, events.router, calibration.router, health.router):
        app.include_router(router, prefix="/api/v1")
    app.include_router(health.router, include_in_schema=False)  # /health for load balancers
    dashboard.install(app)  # the browser pages (templates/) and /static
    return app
