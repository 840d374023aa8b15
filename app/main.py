"""The FastAPI app factory: ``uvicorn --factory app.main:create_app``.

Everything the routes need (settings, the database session factory, Redis clients) lives on
``app.state``, so one process can hold apps for different databases (the tests do).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import redis
from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from redis.backoff import NoBackoff
from redis.retry import Retry

from app import auth, db, guard, json_body, login, web
from app.api import events, health, jobs, plans, uploads, usage, workers
from app.config import Settings, get_settings
from app.sweeper import Sweeper
from worker.engine.contract.spec import METHODS

log = logging.getLogger(__name__)
API_ROUTERS = (jobs.router, plans.router, events.router, uploads.router, health.router, usage.router, workers.router)
DOCS_ASSETS = "/static/api-docs"  # under /static/: public, cacheable, like the dashboard's own files


def create_app(settings: Settings | None = None, *, migrate: bool = True, bind_host: str | None = None) -> FastAPI:
    """``bind_host``: the address ``sparsegpt serve --host`` listens on (a Host header the
    server answers to, besides the loopback names and settings.allowed_hosts)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if migrate:
            db.migrate(settings.database)  # alembic upgrade head
        app.state.sessions = db.session_factory(settings.database)
        # One quick retry (a restarted Redis), not the client's default backoff: while Redis is
        # down, requests answer from the database without waiting on it.
        app.state.redis = redis.Redis.from_url(
            settings.redis,
            decode_responses=True,
            health_check_interval=30,
            socket_connect_timeout=2,
            socket_timeout=10,
            retry=Retry(NoBackoff(), 1),
        )
        app.state.aredis = events.async_redis(settings)  # the live-progress streams' pool
        app.state.local_user = auth.ensure_local_user(app.state.sessions)
        sweeper = Sweeper(settings, app.state.sessions, app.state.redis)
        sweeper.start()  # expired heartbeats, lost queue messages, old artifacts
        try:
            yield
        finally:
            sweeper.stop()
            await app.state.aredis.aclose()
            app.state.redis.close()

    # /docs and /redoc with Swagger UI's and ReDoc's files served by the app (fastapi-offline ships
    # them) instead of a CDN: a server without the internet still shows its API docs.
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        title="sparsegpt-service",
        version="0.1.0",
        summary=f"Queue one-shot LLM pruning jobs ({', '.join(METHODS)}) on shared GPUs.",
        lifespan=lifespan,
        # Every route needs a signed-in user (Bearer token or the dashboard's session cookie),
        # except /health, /login, /logout, static files and the docs: see app.auth.
        dependencies=[Depends(auth.authenticate)],
        responses={401: {"description": "sign in: Authorization: Bearer <token>, or the dashboard's session"}},
    )
    app.state.settings = settings
    # /health for load balancers first: the most frequent request is matched without walking the
    # API's routers (FastAPI tries routes in order; no other route's path is /health).
    app.include_router(health.router, include_in_schema=False)
    for router in API_ROUTERS:
        app.include_router(router, prefix="/api/v1")
    app.include_router(login.router)  # /login, /logout
    web.install(app)  # the browser pages (templates/) and /static
    # 422s name the field and the problem, never the input (a file, a megabyte of JSON).
    app.add_exception_handler(RequestValidationError, json_body.validation_error_handler)
    # Added last, so outermost: Host, cross-site requests, sign-in and body caps are decided
    # before any route runs and before the body is read (app/guard.py).
    docs = {"/docs", "/redoc", app.openapi_url, app.swagger_ui_oauth2_redirect_url} - {None}  # FastAPIOffline's
    app.add_middleware(guard.Guard, settings=settings, bind_host=bind_host, open_paths=frozenset(docs))
    return app
