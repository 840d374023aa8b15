"""What the dashboard's pages show about jobs (issue 23): the jobs list's refit, quantization, retry
link and a queued job's place and rough start; the job page's whole-model sparsity, no flat charts
for uniform patterns, a finished job's real elapsed time; the compare page's timings, artifact sizes
and "failed" cells. Real HTTP to the app (TestClient) on a real database and Redis."""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import timedelta

import pytest
import redis
from fastapi.testclient import TestClient

from app import crud, db, streams
from app.config import Settings
from app.main import create_app
from app.models import Artifact, Metric, ModuleResult, utcnow
from app.web.filters import fmt_duration

REDIS_URL = "redis://127.0.0.1:6379/11"


@pytest.fixture()
def client(tmp_path):
    queue = f"test-views-{uuid.uuid4().hex[:8]}"  # a queue of this test alone
    settings = Settings(data_dir=tmp_path, redis_url=REDIS_URL, auth="off", queue=queue)
    with TestClient(create_app(settings)) as client:
        yield client


def make_job(client, spec: dict, **values) -> int:
    with db.session_scope(client.app.state.settings.database) as session:
        job = crud.create_job(session, spec={"method": "sparsegpt", "sparsity": "2:4", **spec})
        for key, value in values.items():
            setattr(job, key, value)
        session.flush()
        return job.id


def add_modules(client, job_id: int, sparsities: list[float]) -> None:
    with db.session_scope(client.app.state.settings.database) as session:
        session.add_all(
            [
                ModuleResult(job_id=job_id, block=b, name="mlp.up_proj", sparsity=s, error=0.1 * (b + 1), seconds=0.5)
                for b, s in enumerate(sparsities)
            ]
        )


def row_html(html: str, job_id: int) -> str:
    return re.search(rf'<tr id="job-{job_id}".*?</tr>', html, flags=re.S).group(0)


def test_the_jobs_list_shows_refit_quantization_and_a_retrys_original(client):
    refit = make_job(client, {"model": "org/a", "solver": {"refit": "swap+reconstruct"}})
    quant = make_job(
        client,
        {"model": "org/b", "sparsity": 0.5, "quantization": {"scheme": "W4A16", "group_size": 64, "actorder": True}},
    )
    plain = make_job(client, {"model": "org/c"})
    retry = make_job(client, {"model": "org/c"}, retry_of=plain)
    page = client.get("/").text
    assert re.findall(r'data-role="extra">([^<]*)<', row_html(page, refit)) == ["refit swap+reconstruct"]
    assert re.findall(r'data-role="extra">([^<]*)<', row_html(page, quant)) == ["W4A16 g64 actorder"]
    assert 'data-role="extra"' not in row_html(page, plain) and "retry of" not in row_html(page, plain)
    assert f'retry of <a href="/jobs/{plain}">#{plain}</a>' in row_html(page, retry)


def register_worker(queue: str) -> str:
    """A live worker of ``queue`` as a worker announces itself (worker.celery_app: its key, with a TTL)."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    redis.Redis.from_url(REDIS_URL).set(
        streams.worker_key(name), json.dumps({"name": name, "queues": [queue], "pid": 1, "seen": time.time()}), ex=60
    )
    return name


def test_a_queued_job_without_history_has_a_place_and_an_unknown_start(client):
    queue = client.app.state.settings.queue
    first, second = make_job(client, {"model": "org/new"}), make_job(client, {"model": "org/new"})
    name = register_worker(queue)
    try:
        page = client.get("/").text
    finally:
        redis.Redis.from_url(REDIS_URL).delete(streams.worker_key(name))
    assert f"1 of 2 in queue {queue} · starts now" in row_html(page, first)  # nothing ahead, a worker free
    assert f"2 of 2 in queue {queue} · starts unknown" in row_html(page, second)  # behind a job of no known pace


def test_a_queued_jobs_rough_start_from_past_jobs_of_its_model(client):
    """Mean seconds per block of this server's past jobs of the model x the blocks of the jobs ahead."""
    queue = client.app.state.settings.queue
    now = utcnow()
    for seconds, blocks in ((400, 4), (200, 2)):  # 600 s over 6 blocks: 100 s a block; the model has 4 blocks
        done = make_job(
            client,
            {"model": "org/known"},
            status="succeeded",
            started_at=now - timedelta(seconds=seconds),
            finished_at=now,
        )
        add_modules(client, done, [0.5] * blocks)
    first = make_job(client, {"model": "org/known"})
    second = make_job(client, {"model": "org/known", "layers": {"first_block": 2}})  # 2 of the 4 blocks
    third = make_job(client, {"model": "org/known"})
    page = client.get("/").text
    assert "3 in queue" in row_html(page, first) and "starts unknown" in row_html(page, first)  # no live worker
    name = register_worker(queue)
    try:
        page = client.get("/").text
    finally:
        redis.Redis.from_url(REDIS_URL).delete(streams.worker_key(name))
    expected = {first: "now", second: f"in about {fmt_duration(400)}", third: f"in about {fmt_duration(600)}"}
    for position, (job_id, start) in enumerate(expected.items(), 1):
        assert f"{position} of 3 in queue {queue} · starts {start}" in row_html(page, job_id), row_html(page, job_id)
    assert "in queue" not in row_html(page, done)  # a finished job has no place


def test_the_job_page_whole_model_sparsity_and_no_flat_charts(client):
    report = {
        "sparsity": 0.45,
        "sparsity_pruned_modules": 0.5,
        "pattern": "2:4",
        "coverage": {
            "counted": "Linear weights",
            "weights": 900,
            "weights_pruned": 810,
            "weights_dense": 90,
            "dense": [],
            "model_parameters": 1500,
        },
        "profile": {"profile": "uniform", "targets": [0.5, 0.5, 0.5], "achieved": [0.5, 0.5, 0.5]},
    }
    uniform = make_job(client, {"model": "org/u"}, status="succeeded", result=report)
    add_modules(client, uniform, [0.5, 0.5, 0.5])
    page = client.get(f"/jobs/{uniform}").text
    assert 'id="sparsity-model">27.00%' in page  # 0.45 * 900 zeros over 1500 parameters
    assert 'id="sparsity-all">45.00%' in page and 'id="sparsity-pruned">50.00%' in page
    assert 'id="chart-profile"' not in page and 'id="chart-sparsity"' not in page  # flat lines
    assert 'id="chart-error"' in page and 'id="flat-sparsity"' in page and "Every block: 50.00%" in page
    varied = make_job(
        client,
        {"model": "org/v"},
        status="succeeded",
        result={**report, "profile": {"profile": "owl", "targets": [0.4, 0.5, 0.6], "achieved": [0.4, 0.5, 0.6]}},
    )
    add_modules(client, varied, [0.4, 0.5, 0.6])
    page = client.get(f"/jobs/{varied}").text
    assert 'id="chart-profile"' in page and 'id="chart-sparsity"' in page and 'id="flat-sparsity"' not in page
    old = make_job(
        client, {"model": "org/o"}, status="succeeded", result={"sparsity": 0.5, "sparsity_pruned_modules": 0.5}
    )
    assert 'id="sparsity-model"' not in client.get(f"/jobs/{old}").text  # a report without the count: not guessed


def test_a_failed_jobs_elapsed_time_is_started_to_finished(client):
    """Today's page showed the last progress event's clock (here 3 s) as a failed job's elapsed time."""
    now = utcnow()
    failed = make_job(
        client,
        {"model": "org/f"},
        status="failed",
        error="out of memory in block 3",
        started_at=now - timedelta(seconds=754),
        finished_at=now,
        progress={"stage": "pruning", "layer": 2, "layers": 8, "fraction": 0.3, "elapsed_s": 3.0, "message": ""},
    )
    page = client.get(f"/jobs/{failed}").text
    assert 'id="p-elapsed">12m 34s<' in page and 'id="d-ran-for" title="started → finished">12m 34s<' in page
    assert ">3s<" not in page


def test_the_compare_page_timings_artifact_sizes_and_failed_cells(client):
    now = utcnow()
    report = {"seconds": {"load": 2.5, "prune": 61.0, "total": 70.25}, "peak_memory_bytes": 3 * 2**30}
    done = make_job(
        client,
        {"model": "org/x"},
        status="succeeded",
        result=report,
        started_at=now - timedelta(seconds=75),
        finished_at=now,
    )
    failed = make_job(
        client,
        {"model": "org/x"},
        status="failed",
        error="boom",
        started_at=now - timedelta(seconds=9),
        finished_at=now,
    )
    with db.session_scope(client.app.state.settings.database) as session:
        session.add(
            Artifact(
                job_id=done,
                format="hf-tar",
                media_type="application/x-tar",
                path="x.tar",
                size=5 * 2**20,
                sha256="0" * 64,
            )
        )
        session.add(Metric(job_id=done, dataset="wikitext2", dense_perplexity=10.0, perplexity=12.0))
    page = client.get(f"/compare?ids={done},{failed}").text
    rows = {
        key: re.findall(r'<td class="num[^"]*" data-job="\d+">([^<]*)</td>', body)
        for key, body in re.findall(r'<tr data-key="([^"]+)"><th scope="row">[^<]*</th>(.*?)</tr>', page, re.S)
    }
    assert rows["ran for"] == ["1m 15s", "9s"]
    assert rows["load (s)"] == ["2.50s", "failed"] and rows["prune (s)"] == ["1m 01s", "failed"]
    assert rows["total (s)"] == ["1m 10s", "failed"]
    assert rows["peak memory"] == ["3.0 GiB", "failed"] and rows["artifact hf-tar"] == ["5.0 MiB", "failed"]
    ppl = re.search(r'id="ppl-table".*?</table>', page, re.S).group(0)
    assert re.search(rf'data-job="{failed}"><span class="muted">failed</span>', ppl)


def test_a_quantization_only_job_is_called_that_in_the_list(client):
    only = make_job(
        client, {"model": "org/q", "sparsity": 0, "quantization": {"scheme": "W8A16", "group_size": 64}}, sparsity="0"
    )
    pruned = make_job(
        client,
        {"model": "org/p", "sparsity": 0.5, "quantization": {"scheme": "W8A16", "group_size": 64}},
        sparsity="0.5",
    )
    page = client.get("/").text
    assert "quantization only" in row_html(page, only) and "0.0%" not in row_html(page, only)
    assert "quantization only" not in row_html(page, pruned) and "50.0%" in row_html(page, pruned)
