"""/docs and /redoc work on a server without the internet: their files come from the app itself."""

from __future__ import annotations

import re
from urllib.parse import urlparse

from tests.support.browser import shot


def test_the_docs_pages_load_only_from_the_server(page, dashboard):
    base = urlparse(dashboard.base)
    outside: list[str] = []

    def only_this_server(route):  # what a machine without the internet would see
        if urlparse(route.request.url).netloc == base.netloc:
            return route.continue_()
        outside.append((route.request.resource_type, route.request.url))
        return route.abort()

    page.route("**/*", only_this_server)
    try:
        page.goto("/docs")
        page.wait_for_selector(".swagger-ui .opblock", timeout=20_000)  # Swagger UI rendered the operations
        assert page.locator(".opblock-summary-path", has_text="/api/v1/jobs").count() > 0
        shot(page, "api-docs")
        page.goto("/redoc")
        page.wait_for_selector("[role=menuitem], .menu-content li", timeout=20_000)
        assert re.search(r"/api/v1/jobs", page.content())
    finally:
        page.unroute("**/*")
    # both pages rendered with everything else aborted; nothing they need comes from elsewhere (ReDoc's
    # bundle still asks for its "powered by" logo image, which then stays blank)
    assert [url for kind, url in outside if kind != "image"] == [], f"files from elsewhere: {outside}"


def test_the_docs_assets_are_served_as_static_files(dashboard):
    import httpx

    html = httpx.get(f"{dashboard.base}/docs", timeout=10).text
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html)
    assert assets and all(a.startswith("/static/") for a in assets), assets
    for asset in assets:
        r = httpx.get(f"{dashboard.base}{asset}", timeout=10)
        assert r.status_code == 200 and len(r.content) > 10_000, asset
