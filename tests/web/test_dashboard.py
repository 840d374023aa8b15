"""The dashboard in headless Chromium against the real service and a real Celery worker:
submit through the form, watch progress live, read the results and chart, download the
archive, cancel, retry, clone, compare, and the form's errors by their fields.

The tests run in order and share one browser page and the jobs they create."""

from __future__ import annotations

import hashlib
import re
import tarfile

import pytest
from playwright.sync_api import expect

from tests.support.browser import shot

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

state: dict = {}


def wait_status(service, job_id: int, statuses: tuple[str, ...], timeout: float = 90) -> dict:
    return service.wait_status(job_id, statuses, timeout)


def test_pages_and_form_defaults(page, dashboard):
    response = page.goto("/")
    assert response.status == 200
    expect(page.locator("h1")).to_have_text("Jobs")
    expect(page.locator(".empty")).to_contain_text("No jobs yet")
    expect(page.locator("#disk-free")).not_to_have_text("unknown")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(245, 246, 248)", "CSS not served"
    shot(page, "01-jobs-empty")

    page.click("text=New job >> nth=0")
    expect(page).to_have_url(re.compile(r"/jobs/new$"))
    # Every option of the spec, with the API's defaults and a line of help each.
    defaults = {
        "#nsamples": "128",
        "#seed": "0",
        "#blocksize": "128",
        "#percdamp": "0.01",
        "#sparsity": "0.5",
        "#seqlen": "",
        "#wbits": "",
        "#max_windows": "",
        "#revision": "",
        "#model": "",
        "#first_block": "",
        "#last_block": "",
        "#include": "",
        "#exclude": "",
    }
    for selector, value in defaults.items():
        expect(page.locator(selector)).to_have_value(value)
    expect(page.locator("#method")).to_have_value("sparsegpt")
    expect(page.locator("#dtype")).to_have_value("auto")
    expect(page.locator("input[name=calibration_source][value=c4]")).to_be_checked()
    expect(page.locator("input[name=eval_sets][value=wikitext2]")).to_be_checked()
    expect(page.locator("input[name=dense]")).to_be_checked()
    assert page.locator(".field").count() == page.locator(".field .help").count() >= 18
    shot(page, "02-new-job-form")


def test_bad_form_shows_errors_by_their_fields_and_keeps_values(page, dashboard, allowed_dir):
    page.goto("/jobs/new")
    model = str(allowed_dir / "llama")
    page.fill("#model", model)
    page.fill("#sparsity", "3:2")
    page.fill("#nsamples", "0")
    page.fill("#seqlen", "32")
    page.fill("#percdamp", "abc")
    page.select_option("#method", "wanda")
    page.check("input[name=calibration_source][value=path]")
    page.fill("#calibration_path", "/etc/passwd")
    with page.expect_response(lambda r: r.url.endswith("/jobs/new") and r.request.method == "POST") as info:
        page.click("#submit-job")
    assert info.value.status == 422
    expect(page.locator("#form-errors")).to_be_visible()
    expect(page.locator(".field:has(#sparsity) .field-error")).to_contain_text("N:M needs 0 < N < M")
    expect(page.locator(".field:has(#nsamples) .field-error")).to_have_text("Must be at least 1 (got 0)")
    expect(page.locator(".field:has(#percdamp) .field-error")).to_have_text("Must be a number (got abc)")
    assert page.locator(".field.has-error").count() == 3
    # The values come back as typed.
    for selector, value in {
        "#model": model,
        "#sparsity": "3:2",
        "#nsamples": "0",
        "#seqlen": "32",
        "#percdamp": "abc",
        "#calibration_path": "/etc/passwd",
    }.items():
        expect(page.locator(selector)).to_have_value(value)
    expect(page.locator("#method")).to_have_value("wanda")
    expect(page.locator("input[name=calibration_source][value=path]")).to_be_checked()
    shot(page, "03-new-job-errors")

    # Fixed, the spec passes; the server's own checks (allowed directories) answer next.
    page.fill("#sparsity", "2:4")
    page.fill("#nsamples", "4")
    page.fill("#percdamp", "0.01")
    page.click("#submit-job")
    expect(page.locator("#error-calibration_source")).to_contain_text("allowed")
    assert page.locator(".field.has-error").count() == 1
    expect(page.locator("#calibration_path")).to_have_value("/etc/passwd")
    expect(page.locator("#sparsity")).to_have_value("2:4")
    assert dashboard.client.get("/api/v1/jobs").json()["total"] == 0, "a bad form queued a job"


def test_submit_watch_live_results_and_download(page, dashboard, allowed_dir, tmp_path):
    page.goto("/jobs/new")
    page.fill("#model", str(allowed_dir / "llama"))
    page.fill("#sparsity", "2:4")
    page.check("input[name=calibration_source][value=file]")
    page.set_input_files("#calibration_file", str(allowed_dir / "calibration.txt"))
    page.fill("#nsamples", "4")
    page.fill("#seqlen", "32")
    page.uncheck("input[name=eval_sets][value=wikitext2]")
    page.fill("#eval_extra", str(allowed_dir / "eval.txt"))
    page.fill("#max_windows", "2")
    page.select_option("#dtype", "float32")
    page.click("#submit-job")
    expect(page).to_have_url(re.compile(r"/jobs/\d+$"))
    job_id = int(page.url.rsplit("/", 1)[1])
    state["job"] = job_id
    page.evaluate("window.noReload = 'still here'")  # gone if the page reloads

    # Progress moves on the page while the job runs, from the event stream.
    page.wait_for_function("window.sparsegptLive && window.sparsegptLive.events >= 1", timeout=90_000)
    shot(page, "04-job-running")
    page.wait_for_function("document.querySelector('#job-main').dataset.status === 'succeeded'", timeout=90_000)
    assert page.evaluate("window.noReload") == "still here", "the page reloaded"
    live = page.evaluate("window.sparsegptLive")
    assert live["source"] == "sse"
    pruning = [p for p in live["progress"] if p["stage"] == "pruning" and p["layer"] is not None]
    assert {p["layer"] for p in pruning} == {0, 1} and {p["layers"] for p in pruning} == {2}
    fractions = [p["fraction"] for p in live["progress"] if p["fraction"] is not None]
    assert fractions == sorted(fractions) and fractions[-1] > fractions[0]

    # The finished page replaced the live one: perplexities, the chart, timings, the download.
    job = dashboard.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    rows = page.locator("#perplexity tbody tr")
    expect(rows).to_have_count(1)
    metric = job["metrics"][0]
    cells = rows.first.locator("td")
    expect(cells.nth(0)).to_have_text("eval.txt")
    expect(cells.nth(1)).to_have_text(f"{metric['dense_perplexity']:.2f}")
    expect(cells.nth(2)).to_have_text(f"{metric['perplexity']:.2f}")
    expect(cells.nth(3)).to_have_text(f"×{metric['perplexity'] / metric['dense_perplexity']:.3f}")
    # 2:4 is half zeros in every block: said in words, not drawn as a flat chart
    expect(page.locator("#chart-sparsity")).to_have_count(0)
    expect(page.locator("#flat-sparsity")).to_contain_text("Every block: 50.00%")
    expect(page.locator("#chart-error rect.bar-error")).to_have_count(2)
    # the event lines named no server path and none said what the line before it said
    lines = live["lines"]
    assert lines and not [line for line in lines if str(allowed_dir) in line or "/uploads/" in line], lines
    assert all(a != b for a, b in zip(lines, lines[1:])), lines
    expect(page.locator("#timings")).to_contain_text("torch")
    expect(page.locator("#event-log")).to_have_count(0)  # the live panel is gone
    expect(page.locator("#artifact-sha256")).to_have_text(job["artifact"]["sha256"])
    shot(page, "05-job-succeeded")

    with page.expect_download() as info:
        page.click("#download")
    target = tmp_path / "artifact.tar"
    info.value.save_as(target)
    payload = target.read_bytes()
    assert len(payload) == int(page.locator("#artifact-size").get_attribute("data-bytes"))
    assert hashlib.sha256(payload).hexdigest() == job["artifact"]["sha256"]
    with tarfile.open(target) as tar:
        names = {n.rsplit("/", 1)[-1] for n in tar.getnames()}
    assert {"config.json", "model.safetensors", "README.md"} <= names, names


def deep_job(allowed_dir) -> dict:
    """Slow enough on the CPU to be cancelled while it runs."""
    return {
        "model": str(allowed_dir / "llama-deep"),
        "sparsity": 0.5,
        "dtype": "float32",
        "calibration": {"dataset": str(allowed_dir / "valid.txt"), "nsamples": 128, "seqlen": 256},
        "evaluation": {"datasets": []},
    }


def test_jobs_table_refreshes_itself_and_cancel_a_running_job(page, dashboard, allowed_dir):
    page.goto("/")
    page.evaluate("window.noReload = 'still here'")
    row = page.locator(f"#job-{state['job']}")
    expect(row.locator("[data-role=status]")).to_have_text("succeeded")
    expect(row).to_contain_text("→")
    expect(page.locator("#disk-artifacts")).not_to_have_text("0 B")

    # A job queued elsewhere (the API) appears in the open table and shows its progress.
    response = dashboard.client.post("/api/v1/jobs", json=deep_job(allowed_dir))
    assert response.status_code == 201, response.text
    job_id = state["cancel"] = response.json()["id"]
    new_row = page.locator(f"#job-{job_id}")
    expect(new_row).to_be_visible(timeout=30_000)
    expect(new_row.locator("[data-role=status]")).to_have_text("running", timeout=60_000)
    expect(new_row.locator(".progress-text .block")).to_contain_text("of 8", timeout=60_000)
    assert page.evaluate("window.noReload") == "still here", "the table reloaded the page"
    shot(page, "06-jobs-running")

    page.click(f"#job-{job_id} a >> nth=0")
    expect(page).to_have_url(re.compile(rf"/jobs/{job_id}$"))
    expect(page.locator("#p-block")).to_contain_text("of 8")
    page.click("#cancel-job")
    expect(page.locator("#flash")).to_contain_text("Cancel requested")
    page.wait_for_function("document.querySelector('#job-main').dataset.status === 'cancelled'", timeout=60_000)
    expect(page.locator("#cancelled")).to_contain_text("cancelled while running")
    expect(page.locator("#cancel-job")).to_have_count(0)
    expect(page.locator("#download")).to_have_count(0)
    shot(page, "07-job-cancelled")
    job = dashboard.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["artifact"] is None


def test_retry_queues_the_same_spec(page, dashboard):
    old = state["cancel"]
    page.goto(f"/jobs/{old}")
    page.click("#retry-job")
    expect(page).to_have_url(re.compile(r"/jobs/\d+\?message="))
    new = int(page.url.split("?")[0].rsplit("/", 1)[1])
    assert new > old
    expect(page.locator("#flash")).to_contain_text(f"A retry of job {old}")
    original, retried = (dashboard.client.get(f"/api/v1/jobs/{i}").json() for i in (old, new))
    assert retried["spec"] == original["spec"] and retried["status"] in ("queued", "running")
    page.click("#cancel-job")  # not needed: stop it
    expect(page.locator("#flash")).to_contain_text(re.compile("Cancel"))
    wait_status(dashboard, new, ("cancelled",))


def test_clone_edit_and_compare(page, dashboard):
    first = state["job"]
    page.goto(f"/jobs/{first}")
    page.click("#clone-job")
    expect(page).to_have_url(re.compile(rf"/jobs/new\?clone={first}$"))
    spec = dashboard.client.get(f"/api/v1/jobs/{first}").json()["spec"]
    expect(page.locator("#model")).to_have_value(spec["model"])
    expect(page.locator("#sparsity")).to_have_value("2:4")
    expect(page.locator("#nsamples")).to_have_value("4")
    expect(page.locator("#seqlen")).to_have_value("32")
    expect(page.locator("#max_windows")).to_have_value("2")
    expect(page.locator("#dtype")).to_have_value("float32")
    expect(page.locator("input[name=calibration_source][value=upload]")).to_be_checked()
    expect(page.locator("#calibration_upload")).to_have_value(spec["calibration"]["dataset"])
    expect(page.locator("#eval_extra")).to_have_value(spec["evaluation"]["datasets"][0])
    page.select_option("#method", "wanda")
    page.click("#submit-job")
    expect(page).to_have_url(re.compile(r"/jobs/\d+$"))
    clone = int(page.url.rsplit("/", 1)[1])
    page.wait_for_function("document.querySelector('#job-main').dataset.status === 'succeeded'", timeout=90_000)
    cloned = dashboard.client.get(f"/api/v1/jobs/{clone}").json()
    assert cloned["spec"] == {**spec, "method": "wanda"}

    # Compare them from the table's checkboxes.
    page.goto("/")
    page.check(f"#job-{first} input[name=ids]")
    page.check(f"#job-{clone} input[name=ids]")
    page.click("#compare-selected")
    expect(page).to_have_url(re.compile(r"/compare\?"))
    diff = page.locator("#spec-table tr.diff")
    expect(diff).to_have_count(1)
    expect(diff).to_have_attribute("data-key", "method")
    expect(diff).to_contain_text("wanda")
    expect(page.locator("#ppl-table tbody tr")).to_have_count(1)
    expect(page.locator("#ppl-table tbody td")).to_have_count(2)
    expect(page.locator("#compare-chart polyline.series")).to_have_count(2)
    shot(page, "08-compare")


def test_status_filter(page, dashboard):
    page.goto("/")
    expect(page.locator("table.jobs tbody tr")).to_have_count(4)
    page.click(".filters a[data-status=cancelled]")
    expect(page).to_have_url(re.compile(r"/\?status=cancelled$"))
    rows = page.locator("table.jobs tbody tr")
    expect(rows).to_have_count(2)
    for i in range(2):
        expect(rows.nth(i)).to_have_attribute("data-status", "cancelled")
    ids = [int(rows.nth(i).get_attribute("data-job")) for i in range(2)]
    assert ids == sorted(ids, reverse=True), "newest first"
    shot(page, "10-jobs-filtered")


def test_not_found_and_bad_queries(page, dashboard):
    response = page.goto("/jobs/999999")
    assert response.status == 404
    expect(page.locator("#error-message")).to_contain_text("There is no job")
    shot(page, "09-not-found")
    assert page.goto("/jobs/x' or 1=1").status == 404
    assert page.goto("/compare?ids=1,abc").status == 400
    assert page.goto("/?status=nope").status == 400
    assert page.goto("/jobs/new?clone=424242").status == 404
    response = page.goto("/compare")
    assert response.status == 200
    expect(page.locator("#compare-help")).to_be_visible()


def test_a_failed_job_shows_its_reason(page, dashboard, allowed_dir):
    page.goto("/jobs/new")
    page.fill("#model", str(allowed_dir))  # a directory, but no model in it: refused at submit, nothing queued
    page.check("input[name=calibration_source][value=path]")
    page.fill("#calibration_path", str(allowed_dir / "calibration.txt"))
    page.uncheck("input[name=eval_sets][value=wikitext2]")
    page.click("#submit-job")
    expect(page.locator("body")).to_contain_text("holds no loadable model: config.json is missing")
    assert re.search(r"/jobs/new$|/jobs$", page.url), page.url
    broken = allowed_dir / "broken-model"  # looks loadable, fails on the worker: its weights are not safetensors
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "tokenizer.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    page.goto("/jobs/new")
    page.fill("#model", str(broken))
    page.check("input[name=calibration_source][value=path]")
    page.fill("#calibration_path", str(allowed_dir / "calibration.txt"))
    page.fill("#nsamples", "4")
    page.fill("#seqlen", "32")
    page.uncheck("input[name=eval_sets][value=wikitext2]")
    page.click("#submit-job")
    expect(page).to_have_url(re.compile(r"/jobs/\d+$"))
    job_id = int(page.url.rsplit("/", 1)[1])
    page.wait_for_function("document.querySelector('#job-main').dataset.status === 'failed'", timeout=60_000)
    job = dashboard.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]
    expect(page.locator("#failure h2")).to_have_text("This job failed")
    expect(page.locator("#failure-reason")).to_have_text(job["error"])
    expect(page.locator("#retry-job")).to_be_visible()
    shot(page, "11-job-failed")
