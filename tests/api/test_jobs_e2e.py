"""End to end with real processes: the API (`sparsegpt serve --workers 0`) and a Celery worker
(`sparsegpt worker`), Redis and the database, on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time

import httpx
import pytest

from tests.support.processes import read_sse
from tests.support.stacks import SMALL
from worker.engine.contract.report import Report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uploaded(service, calib_bytes) -> str:
    response = service.client.post("/api/v1/calibration-sets", files={"file": ("wiki.txt", calib_bytes)})
    assert response.status_code == 201, response.text
    return response.json()["ref"]


def small_job(models_dir, ref: str, model: str = "llama", **changes) -> dict:
    body = {
        "model": str(models_dir / model),
        "sparsity": "2:4",
        "method": "sparsegpt",
        "calibration": {"dataset": ref, **SMALL},
        "evaluation": {"datasets": [ref], "max_windows": 2},
        "dtype": "float32",
    }
    body.update(changes)
    return body


def test_job_end_to_end(service, models_dir, uploaded, tmp_path):
    client = service.client
    response = client.post("/api/v1/jobs", json=small_job(models_dir, uploaded))
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]

    # Follow it live: the snapshot first, then events in stream order, to the terminal state.
    received = []
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events", timeout=120) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for event in read_sse(stream):
            received.append(event)
            if len(received) == 4:
                break  # drop the connection mid-job ...
    cut = received[-1]["id"]
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": cut}, timeout=120) as stream:
        resumed = list(read_sse(stream))  # ... and resume after the last id seen
    assert received[0]["event"] == "snapshot" and received[0]["data"]["id"] == job_id
    assert received[0]["data"]["status"] in ("queued", "running")
    events = received[1:] + resumed
    ids = [tuple(map(int, e["id"].split("-"))) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "events out of order or repeated"

    # Nothing was lost across the reconnect: the whole stream replayed from the start matches.
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "0"}) as stream:
        replay = list(read_sse(stream))
    snapshot_id = received[0]["id"]
    assert [e["id"] for e in replay if e["id"] > snapshot_id or snapshot_id == "0"] == [e["id"] for e in events]

    statuses = [e["data"]["status"] for e in replay if e["event"] == "status"]
    assert statuses == ["running", "succeeded"]
    assert replay[-1]["event"] == "status" and replay[-1]["data"]["status"] == "succeeded"
    progress = [e["data"] for e in replay if e["event"] == "progress"]
    assert all(p["job"] == job_id for p in progress)
    fractions = [p["fraction"] for p in progress if p["fraction"] is not None]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    pruned_blocks = {p["layer"] for p in progress if p["stage"] == "pruning" and p["layer"] is not None}
    layers = {p["layers"] for p in progress if p["stage"] == "pruning" and p["layers"] is not None}
    assert layers == {2} and pruned_blocks == {0, 1}, "at least one event per block"
    stages = [p["stage"] for p in progress]
    assert stages.index("pruning") > stages.index("calibrating") and "evaluating" in stages and "saving" in stages

    # The job: metrics, per-module results, the artifact's size and sha256.
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["attempt"] == 1 and job["error"] is None
    assert job["started_at"] and job["finished_at"] and job["finished_at"] >= job["started_at"]
    assert job["result"]["pattern"] == "2:4" and job["result"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    # the worker stores the whole report (worker.engine.contract.report), each path named as the user named it
    assert set(job["result"]) == {f.alias or n for n, f in Report.model_fields.items()}
    assert list(job["result"]["perplexity"]) == [uploaded] and job["result"]["output"] == f"sparsegpt-job-{job_id}"
    [metric] = job["metrics"]
    assert metric["dataset"] == uploaded and metric["dense_perplexity"] > 1 and metric["perplexity"] > 1
    modules = job["modules"]
    assert {m["block"] for m in modules} == {0, 1}
    assert len(modules) == 14  # q, k, v, o, gate, up, down in each of 2 LLaMA blocks
    assert all(m["sparsity"] == pytest.approx(0.5) and m["error"] is not None and m["error"] >= 0 for m in modules)
    artifact = job["artifact"]
    assert artifact["url"] == f"/api/v1/jobs/{job_id}/artifact" and artifact["size"] > 0

    # Download, check the sha256, unpack, load with transformers, measure the sparsity.
    download = client.get(artifact["url"])
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/x-tar"
    assert download.headers["x-checksum-sha256"] == artifact["sha256"]
    assert len(download.content) == artifact["size"]
    assert hashlib.sha256(download.content).hexdigest() == artifact["sha256"]
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        names = tar.getnames()
        assert all(n.startswith(f"sparsegpt-job-{job_id}/") for n in names)
        tar.extractall(tmp_path, filter="data")
    model_dir = tmp_path / f"sparsegpt-job-{job_id}"
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in model_dir.iterdir()}

    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight.detach()
            groups = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)
            assert (groups >= 2).all(), f"{name} is not 2:4 sparse"
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer("hello world", return_tensors="pt")["input_ids"].shape[1] > 0

    # Downloading twice gives the same bytes (the archive is reproducible).
    assert hashlib.sha256(client.get(artifact["url"]).content).hexdigest() == artifact["sha256"]


def test_exact_reaches_the_engine(service, models_dir, uploaded):
    """solver.exact runs the engine's exact mode: the saved report says so, and it is 2:4."""
    body = small_job(models_dir, uploaded, solver={"exact": True}, evaluation={"datasets": []})
    response = service.client.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job = service.wait_done(response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["spec"]["solver"]["exact"] is True
    download = service.client.get(job["artifact"]["url"])
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        [member] = [m for m in tar.getmembers() if m.name.endswith("/sparsegpt_report.json")]
        report = json.load(tar.extractfile(member))
    assert report["spec"]["solver"]["exact"] is True and report["pattern"] == "2:4"


def test_cancel_running_and_queued(service, models_dir, uploaded):
    client = service.client
    deep = small_job(
        models_dir,
        uploaded,
        model="llama-deep",
        calibration={"dataset": uploaded, "nsamples": 16, "seqlen": 64},
        evaluation={"datasets": []},
    )
    running_id = client.post("/api/v1/jobs", json=deep).json()["id"]
    # Behind it on the single worker (prefetch 1): this one stays queued.
    queued_id = client.post("/api/v1/jobs", json=small_job(models_dir, uploaded)).json()["id"]

    events = []
    with client.stream("GET", f"/api/v1/jobs/{running_id}/events", timeout=120) as stream:
        for event in read_sse(stream):
            events.append(event)
            if event["event"] == "progress" and event["data"]["stage"] == "pruning":
                break
    assert client.get(f"/api/v1/jobs/{queued_id}").json()["status"] == "queued"
    cancel_queued = client.post(f"/api/v1/jobs/{queued_id}/cancel")
    assert cancel_queued.status_code == 200 and cancel_queued.json()["status"] == "cancelled"
    cancel_running = client.post(f"/api/v1/jobs/{running_id}/cancel")
    assert cancel_running.status_code == 202, cancel_running.text
    assert cancel_running.json()["cancel_requested"] is True

    with client.stream(
        "GET", f"/api/v1/jobs/{running_id}/events", headers={"Last-Event-ID": events[-1]["id"]}
    ) as stream:
        rest = list(read_sse(stream))
    assert rest[-1]["event"] == "status" and rest[-1]["data"]["status"] == "cancelled"
    job = service.wait_done(running_id)
    assert job["status"] == "cancelled" and job["artifact"] is None
    # It stopped between modules, well before the end.
    pruned = [e for e in events + rest if e["event"] == "progress" and e["data"]["stage"] == "pruning"]
    assert max(e["data"]["layer"] or 0 for e in pruned) < 7
    assert client.get(f"/api/v1/jobs/{running_id}/artifact").status_code == 409
    artifacts = service_artifacts(service, running_id)
    assert artifacts == [], f"partial artifact left behind: {artifacts}"

    # The queued one's message still reaches the worker, which leaves the job alone.
    time.sleep(1.0)
    later = service.wait_done(queued_id)
    assert later["status"] == "cancelled" and later["attempt"] == 0 and later["started_at"] is None
    expected = f"job {queued_id} not run: job is already cancelled"
    deadline = time.monotonic() + 30
    while expected not in service.worker.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert expected in service.worker.log.read_text()


def service_artifacts(service, job_id: int) -> list[str]:
    from pathlib import Path

    root = Path(service.env["SPARSEGPT_DATA_DIR"]) / "artifacts" / str(job_id)
    return [str(p) for p in root.rglob("*")] if root.exists() else []


def test_failure_reason_is_recorded(service, models_dir, uploaded):
    """A job the engine refuses (seqlen beyond the tiny model's 256-token context) fails with its reason."""
    body = small_job(models_dir, uploaded, calibration={"dataset": uploaded, "nsamples": 2, "seqlen": 4096})
    job_id = service.client.post("/api/v1/jobs", json=body).json()["id"]
    job = service.wait_done(job_id)
    assert job["status"] == "failed" and job["attempt"] == 1
    assert "seqlen" in job["error"] and "internal error" not in job["error"]
    assert service.client.get(f"/api/v1/jobs/{job_id}/artifact").status_code == 409
    with service.client.stream("GET", f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "0"}) as stream:
        last = list(read_sse(stream))[-1]
    assert last["data"]["status"] == "failed" and last["data"]["error"] == job["error"]


def test_upload_cap_over_a_real_socket(service):
    """Streamed without Content-Length through uvicorn: 413 once the cap is passed."""
    boundary = "cap-boundary"
    sent = {"bytes": 0}

    def body():
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n\r\n').encode()
        for _ in range(200):  # 200 x 64 KiB = 12.5 MiB, far beyond the 256 KiB cap
            sent["bytes"] += 65536
            yield b"y" * 65536
            time.sleep(0.002)
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        response = httpx.post(
            f"{service.base}/api/v1/calibration-sets",
            content=body(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
            timeout=30,
        )
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        response = None  # the server answered and closed while the client was still sending
    if response is not None:
        assert response.status_code == 413, response.text
    assert sent["bytes"] < 200 * 65536 or response is not None
    listed = service.client.get("/api/v1/calibration-sets").json()["items"]
    assert not any(item["name"] == "big.txt" for item in listed)


def test_health_sees_the_worker(service):
    body = service.client.get("/health").json()
    assert body["status"] == "ok" and body["database"]["ok"] and body["redis"]["ok"]
    assert any(w["name"].startswith("test-") and w["seen_s_ago"] < 30 for w in body["workers"])
