"""The plan page's template and script on their own (no API, worker or database): templates/plan.html
rendered from a plan JSON made here in the design's shape, served with the real static files
(app/static/plan.js, the vendored Chart.js) under the plan pages' Content-Security-Policy, in
headless Chromium. The chart is drawn (pixels, the Chart.js instance, one dataset per scheme, the
Pareto front as the server marked it, the recommended point as a ring, the dense and budget lines),
the table holds the JSON's rows, a name with markup is text; a running plan refreshes itself from
its API URL (chart redrawn, table swapped) without a reload and stops once it finished.

tests/web/test_plan_page.py runs the same page end to end with a real plan."""

from __future__ import annotations

import copy
import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from starlette.requests import Request

from app.web.plan_view import PLAN_CSP, page_context
from app.web.render import templates
from tests.support.browser import shot
from tests.support.paths import REPO

STATIC = REPO / "app" / "static"
TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
MB = 1_000_000


def _point(key, sparsity, quantization, *, status="succeeded", ppl=None, size=None, job=None, **extra):
    return {
        "key": key,
        "method": "sparsegpt",
        "sparsity": sparsity,
        "quantization": quantization,
        "refit": False,
        "state": "dense" if key == "dense" else ("pending" if status == "pending" else "job"),
        "reason": None,
        "job_id": job,
        "job_url": f"/jobs/{job}" if job else None,
        "status": "dense" if key == "dense" else status,
        "perplexity": ppl,
        "mean_accuracy": None,
        "bytes": size,
        "format": ("compressed-tensors" if quantization else "hf-tar") if size and key != "dense" else None,
        "download_url": f"/api/v1/jobs/{job}/artifact" if job and status == "succeeded" else None,
        "ratio": size / (4 * MB) if size else None,
        "quality_change_pct": (ppl / 20.0 - 1) * 100 if ppl else None,
        "accuracy_drop_points": None,
        "meets_budget": None,
        "pareto": False,
        "recommended": False,
        **extra,
    }


def finished_plan() -> dict:
    """A 6-point grid (0 / 0.5 / 2:4 x none / W4A16), dense perplexity 20 at 4 MB."""
    points = [
        _point("dense", "0", None, ppl=20.0, size=4 * MB, pareto=True),
        _point("sparsegpt-0.5-none", "0.5", None, ppl=23.0, size=4 * MB, job=2),
        _point("sparsegpt-2:4-none", "2:4", None, ppl=30.0, size=4 * MB, job=3),
        _point("sparsegpt-0-W4A16", "0", "W4A16", ppl=20.8, size=int(1.2 * MB), job=4, pareto=True, recommended=True),
        _point("sparsegpt-0.5-W4A16", "0.5", "W4A16", ppl=24.5, size=int(1.2 * MB), job=5),
        _point("sparsegpt-2:4-W4A16", "2:4", "W4A16", status="failed", job=6),
    ]
    return {
        "id": 7,
        "url": "/plans/7",
        "api_url": "/api/v1/plans/7",
        "name": "<script>alert(1)</script> & co",
        "owner": "alice",
        "model": "/models/llama",
        "mode": "grid",
        "budget": None,
        "priority": "normal",
        "status": "succeeded",
        "created_at": "2026-12-07T10:00:00",
        "finished_at": "2026-12-07T10:20:00",
        "dense": {
            "perplexity": {"wikitext2": 20.0},
            "accuracy": {},
            "mean_accuracy": None,
            "bytes": 4 * MB,
            "job_id": 2,
        },
        "metric": "perplexity",
        "dataset": "wikitext2",
        "points": points,
        "recommended": {"key": "sparsegpt-0-W4A16", "job_id": 4, "download_url": "/api/v1/jobs/4/artifact"},
        "recommendation_reason": "no budget was set: the smallest artifact on the Pareto front whose perplexity "
        "is at most +10% of the dense model's",
        "counts": {"pending": 0, "queued": 0, "running": 0, "succeeded": 4, "failed": 1, "cancelled": 0, "skipped": 0},
    }


def running_plan() -> dict:
    """The same plan earlier: two jobs done, the rest waiting, a perplexity budget of +25%."""
    plan = finished_plan()
    plan.update(status="running", finished_at=None, recommended=None, mode="budget")
    plan["budget"] = {"metric": "perplexity", "max_increase_pct": 25}
    for point in plan["points"][3:]:
        point.update(status="queued", perplexity=None, bytes=None, ratio=None, quality_change_pct=None)
        point.update(download_url=None, pareto=False, recommended=False, format=None)
    plan["counts"] = {**plan["counts"], "succeeded": 2, "failed": 0, "queued": 3}
    return plan


def render_page(plan: dict) -> str:
    request = Request({"type": "http", "method": "GET", "path": plan["url"], "headers": [], "query_string": b""})
    context = {**page_context(plan), "may_change": False, "message": "", "request": request, "current_user": None}
    return templates.env.get_template("plan.html").render(context)


@contextmanager
def site(files: dict[str, tuple[str, bytes]]) -> Iterator[str]:
    """The plan page, its API URL and the real static files over HTTP, with the plan pages' CSP."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            path = self.path.split("?")[0]
            if path.startswith("/static/") and ".." not in path and (STATIC / path[8:]).is_file():
                found = (
                    TYPES.get((STATIC / path[8:]).suffix, "application/octet-stream"),
                    (STATIC / path[8:]).read_bytes(),
                )
            else:
                found = files.get(path)
            if found is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("content-type", found[0])
            self.send_header("content-security-policy", PLAN_CSP)
            self.send_header("x-content-type-options", "nosniff")
            self.send_header("content-length", str(len(found[1])))
            self.end_headers()
            self.wfile.write(found[1])

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def serve(files: dict, plan: dict) -> None:
    files["/plans/7"] = ("text/html; charset=utf-8", render_page(plan).encode())
    files["/api/v1/plans/7"] = ("application/json", json.dumps(plan).encode())


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield page
    context.close()
    assert errors == [], errors


def chart_state(page) -> dict:
    """What Chart.js holds for the plan's canvas: its datasets (label, type, the points' keys and
    x/y), and how many of the canvas's pixels are not blank."""
    return page.evaluate(
        """() => {
        const canvas = document.getElementById('plan-chart');
        const chart = window.Chart && Chart.getChart(canvas);
        if (!chart) return null;
        const ctx = canvas.getContext('2d');
        const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        let inked = 0;
        for (let i = 3; i < px.length; i += 4) if (px[i] > 0) inked++;
        return {
          inked, pixels: canvas.width * canvas.height,
          sets: chart.data.datasets.map(d => ({label: d.label, type: d.type || 'scatter', stepped: d.stepped || false,
            keys: d.data.map(p => p.key || null), xy: d.data.map(p => [p.x, p.y]), radius: d.pointRadius || 0})),
        };
    }"""
    )


def rows_of(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#plan-table tbody tr",
        """rows => rows.map(r => ({key: r.dataset.key, status: r.dataset.status, job: r.dataset.job,
            pareto: r.dataset.pareto, recommended: r.dataset.recommended || null,
            bytes: r.querySelector('[data-role=bytes]').dataset.bytes,
            cells: [...r.cells].map(c => c.innerText.trim())}))""",
    )


def test_the_chart_and_table_of_a_finished_plan(page):
    plan = finished_plan()
    files: dict = {}
    serve(files, plan)
    with site(files) as base:
        page.goto(base + "/plans/7")
        page.wait_for_selector("#plan-chart[data-drawn=true]")
        state = chart_state(page)
        assert state is not None and state["inked"] > 0.02 * state["pixels"], state and state["inked"]
        sets = {s["label"]: s for s in state["sets"]}
        assert [s["label"] for s in state["sets"][:2]] == ["no quantization", "W4A16"]  # one per scheme in the plan
        assert sorted(sets["no quantization"]["keys"]) == ["dense", "sparsegpt-0.5-none", "sparsegpt-2:4-none"]
        assert sorted(sets["W4A16"]["keys"]) == [
            "sparsegpt-0-W4A16",
            "sparsegpt-0.5-W4A16",
        ]  # the failed one has no point
        front = sets["Pareto front"]
        assert front["type"] == "line" and front["stepped"] == "before"  # Chart.js's "before": across, then down
        assert front["keys"] == ["sparsegpt-0-W4A16", "dense"]  # by bytes: the server's pareto flags
        assert sets["recommended"]["keys"] == ["sparsegpt-0-W4A16"] and sets["recommended"]["radius"] > 8
        assert {y for _, y in sets["dense model"]["xy"]} == {20.0}
        assert "budget limit" not in sets  # a grid has none
        assert page.locator("#plan-chart").get_attribute("data-points") == "5"

        rows = rows_of(page)
        assert [r["key"] for r in rows] == [p["key"] for p in plan["points"]]
        for row, point in zip(rows, plan["points"]):
            assert row["status"] == point["status"] and row["job"] == str(point["job_id"] or "")
            assert row["bytes"] == str(point["bytes"] or "") and row["pareto"] == str(point["pareto"]).lower()
        assert [r["key"] for r in rows if r["recommended"]] == ["sparsegpt-0-W4A16"]
        recommended = rows[3]["cells"]
        assert recommended[0].startswith("sparsegpt · no pruning · W4A16") and "recommended" in recommended[0]
        assert recommended[2:6] == ["20.80", "+4.0%", "1.1 MiB", "×0.30"]
        assert page.locator("#download-recommended").get_attribute("href") == "/api/v1/jobs/4/artifact"
        assert page.locator("#plan-csv").get_attribute("href") == "/api/v1/plans/7/table.csv"
        assert page.locator("#cancel-plan").count() == 0 and page.locator("#plan-live").count() == 0

        # the name is text, not markup; the page's only scripts are files of this server
        assert page.locator("#plan-name").inner_text() == "<script>alert(1)</script> & co"
        assert page.locator("#plan-name script").count() == 0
        scripts = page.eval_on_selector_all("script", "els => els.map(e => [e.type, e.getAttribute('src')])")
        assert all(src and src.startswith("/static/") for kind, src in scripts if kind != "application/json")
        shot(page, "plan-unit")


def test_a_running_plan_refreshes_in_place(page):
    plan = running_plan()
    files: dict = {}
    serve(files, plan)
    with site(files) as base:
        page.goto(base + "/plans/7")
        page.wait_for_selector("#plan-chart[data-drawn=true]")
        sets = {s["label"]: s for s in chart_state(page)["sets"]}
        assert sets["W4A16"]["keys"] == [] and sets["recommended"]["keys"] == []
        assert {y for _, y in sets["budget limit"]["xy"]} == {25.0}  # dense 20 x (1 + 25%)
        assert page.locator("#plan-live").count() == 1 and page.locator("#no-recommendation").count() == 1
        page.evaluate("window.__sameDocument = true")  # gone if the page reloads

        done = finished_plan()
        done.update(mode="budget", budget=plan["budget"])
        serve(files, done)  # the API and the page now answer the finished plan
        page.wait_for_selector("#plan-main[data-active=false]", timeout=20_000)
        assert page.evaluate("window.__sameDocument") is True
        sets = {s["label"]: s for s in chart_state(page)["sets"]}
        assert sorted(sets["W4A16"]["keys"]) == ["sparsegpt-0-W4A16", "sparsegpt-0.5-W4A16"]
        assert sets["recommended"]["keys"] == ["sparsegpt-0-W4A16"]
        assert [r["status"] for r in rows_of(page)] == [p["status"] for p in done["points"]]
        assert page.locator("#download-recommended").count() == 1 and page.locator("#plan-live").count() == 0
        assert page.locator('#plan-counts [data-count="succeeded"] .value').inner_text() == "4"
        fresh = copy.deepcopy(rows_of(page))
        page.reload()
        page.wait_for_selector("#plan-chart[data-drawn=true]")
        assert rows_of(page) == fresh  # refreshed in place = loaded afresh
