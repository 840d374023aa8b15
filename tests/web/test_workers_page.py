"""The Workers page in headless Chromium against the real service and its real Celery worker:
reached from the menu, it lists the worker (CPU only here), its queues, its last heartbeat, and
the job it runs while it runs one."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_workers_page_shows_the_worker_and_its_job(page, dashboard, allowed_dir):
    page.goto("/")
    page.click("nav >> text=Workers")
    expect(page).to_have_url(f"{dashboard.base}/workers")
    row = page.locator('#workers-table tr[data-worker^="test-dashboard@"]')
    expect(row).to_have_count(1)
    expect(row.locator(".worker-gpu")).to_have_text("CPU only")
    expect(row.locator(".worker-seen")).to_contain_text("s ago")
    expect(row.locator(".worker-queues")).to_contain_text(dashboard.env["SPARSEGPT_QUEUE"])
    body = {
        "model": str(allowed_dir / "llama-deep"),
        "sparsity": 0.5,
        "dtype": "float32",
        "calibration": {"dataset": str(allowed_dir / "calibration.txt"), "nsamples": 32, "seqlen": 64},
        "evaluation": {"datasets": [str(allowed_dir / "eval.txt")], "max_windows": 2},
    }
    job_id = dashboard.client.post("/api/v1/jobs", json=body).json()["id"]
    try:
        link = row.locator(f'.worker-job a[href="/jobs/{job_id}"]')
        for _ in range(120):
            page.reload()
            if link.count():
                break
            page.wait_for_timeout(250)
        expect(link).to_have_text(f"job {job_id}")
    finally:
        dashboard.client.post(f"/api/v1/jobs/{job_id}/cancel")
