"""The browser dashboard: server-rendered Jinja2 pages (templates/, installed as the package
``app.templates``) and static files (app/static/, package data).

- ``pages``: the jobs table (/), the new-job form (/jobs/new), a job (/jobs/{id}), a comparison
  (/compare?ids=1,2); ``workers_page``: the live workers (/workers); ``plans``: compression plans
  (/plans, /plans/new, /plans/{id}), with ``plan_forms`` (its form) and ``plan_view`` (how it reads)
- ``actions``: what the pages' forms post: a new job, cancel, retry; each parses the form,
  calls ``app.services`` (the same path as the API) and renders
- ``forms``: the new-job form's inputs <-> the job spec, built from the spec's own fields
- ``charts``: the SVG charts; ``filters``: how values read; ``render``: templates and error pages
- ``csrf``: the forms' tokens against cross-site request forgery

Live updates come from the API (SSE and JSON) through a small script, app/static/dashboard.js.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app.web import actions, pages, plans, workers_page

STATIC_DIR = str(files("app").joinpath("static"))  # package data, installed or not


async def favicon(request) -> FileResponse:
    return FileResponse(
        f"{STATIC_DIR}/favicon.svg", media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"}
    )


def install(app: FastAPI) -> None:
    """Register the dashboard's pages, its forms' actions and its static files on the app."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_route("/favicon.ico", favicon, include_in_schema=False)  # browsers ask for it unprompted
    app.include_router(pages.router)
    app.include_router(workers_page.router)
    app.include_router(actions.router)
    app.include_router(plans.router)
