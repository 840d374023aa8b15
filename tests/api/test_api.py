"""The REST API in-process (TestClient) on SQLite and PostgreSQL: the happy paths that need no
worker, and every 4xx. Jobs go to a queue no worker consumes, so they stay queued."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.support.stacks import SMALL, UPLOAD_LIMIT


@pytest.fixture(scope="module")
def client(service_env) -> TestClient:
    env = service_env
    settings = Settings(
        _env_file=None,
        data_dir=env["SPARSEGPT_DATA_DIR"],
        database_url=env["DATABASE_URL"],
        redis_url=env["REDIS_URL"],
        local_dirs=env["SPARSEGPT_LOCAL_DIRS"],
        queue=f"idle-{secrets.token_hex(3)}",
        max_upload_bytes=UPLOAD_LIMIT,
        max_nsamples=512,
        max_seqlen=4096,
        max_eval_sets=3,
        # Single-user mode (everyone is the local admin) and no per-user cap: these tests are
        # about the API's input handling; tests/team covers accounts and limits.
        auth="off",
        max_active_jobs_per_user=0,
        sweep_interval_s=0,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def upload(client, calib_bytes) -> dict:
    response = client.post("/api/v1/calibration-sets", files={"file": ("wiki.txt", calib_bytes, "text/plain")})
    assert response.status_code == 201, response.text
    return response.json()


def spec(models_dir: Path, **changes) -> dict:
    body = {"model": str(models_dir / "llama"), "sparsity": "2:4", "calibration": {"dataset": "wikitext2", **SMALL}}
    body.update(changes)
    return body


def messages(response) -> str:
    detail = response.json()["detail"]
    return " | ".join(d["msg"] for d in detail) if isinstance(detail, list) else detail


# --- happy paths --------------------------------------------------------------------------


def test_submit_returns_201_location_and_defaults(client, models_dir, upload):
    response = client.post(
        "/api/v1/jobs",
        json=spec(
            models_dir, calibration={"dataset": upload["ref"], **SMALL}, evaluation={"datasets": [upload["ref"]]}
        ),
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert response.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempt"] == 0 and job["artifact"] is None
    assert job["spec"]["solver"] == {"blocksize": 128, "percdamp": 0.01, "wbits": None, "exact": False, "refit": "none"}
    assert job["spec"]["method"] == "sparsegpt" and job["spec"]["dtype"] == "auto"
    assert job["spec"]["calibration"] == {"dataset": upload["ref"], "nsamples": 4, "seqlen": 32, "seed": 0}
    again = client.get(response.headers["location"])
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    assert again.json()["spec"] == job["spec"]


def test_hub_model_and_ratio(client):
    response = client.post("/api/v1/jobs", json={"model": "facebook/opt-125m", "sparsity": "50%", "method": "wanda"})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["sparsity"] == "0.5" and job["spec"]["sparsity"] == 0.5 and job["method"] == "wanda"
    assert job["spec"]["calibration"]["dataset"] == "c4" and job["spec"]["calibration"]["nsamples"] == 128
    assert job["spec"]["evaluation"]["datasets"] == ["wikitext2"]


def test_local_file_datasets_are_resolved(client, models_dir):
    link = models_dir / f"link-{secrets.token_hex(3)}.txt"
    link.symlink_to(models_dir / "calib.txt")
    body = spec(
        models_dir,
        calibration={"dataset": str(link), **SMALL},
        evaluation={"datasets": [str(models_dir / "calib.txt")]},
    )
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["calibration"]["dataset"] == str((models_dir / "calib.txt").resolve())


def test_list_newest_first_paginated_and_filtered(client, models_dir):
    ids = [client.post("/api/v1/jobs", json=spec(models_dir)).json()["id"] for _ in range(3)]
    page = client.get("/api/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["items"]] == [ids[2], ids[1]]
    assert page["limit"] == 2 and page["offset"] == 0 and page["total"] >= 3
    second = client.get("/api/v1/jobs", params={"limit": 2, "offset": 1}).json()
    assert [j["id"] for j in second["items"]] == [ids[1], ids[0]]
    client.post(f"/api/v1/jobs/{ids[1]}/cancel")
    cancelled = client.get("/api/v1/jobs", params={"status": "cancelled", "limit": 200}).json()
    assert ids[1] in [j["id"] for j in cancelled["items"]]
    assert all(j["status"] == "cancelled" for j in cancelled["items"])
    queued = client.get("/api/v1/jobs", params={"status": "queued", "limit": 200}).json()
    assert ids[1] not in [j["id"] for j in queued["items"]] and ids[2] in [j["id"] for j in queued["items"]]


def test_cancel_queued_then_conflicts(client, models_dir):
    job_id = client.post("/api/v1/jobs", json=spec(models_dir)).json()["id"]
    response = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    again = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    assert client.get(f"/api/v1/jobs/{job_id}/artifact").status_code == 409
    # Its event stream: the snapshot says cancelled and the stream ends.
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as events:
        text = events.read().decode()
    assert "event: snapshot" in text and '"status": "cancelled"' in text
    # Replayed from the start: the status event the cancel published.
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "0"}) as events:
        text = events.read().decode()
    assert "event: status" in text and '"status":"cancelled"' in text and "event: snapshot" not in text


def test_health(client):
    body = client.get("/api/v1/health").json()
    assert body["database"]["ok"] and body["redis"]["ok"]
    assert client.get("/health").status_code == 200


def test_openapi_and_docs(client):
    schema = client.get("/openapi.json").json()
    for path in (
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}/events",
        "/api/v1/jobs/{job_id}/artifact",
        "/api/v1/calibration-sets",
    ):
        assert path in schema["paths"]
    assert "multipart/form-data" in schema["paths"]["/api/v1/calibration-sets"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_the_result_schema_is_the_engines_report(client):
    """A job's ``result`` is typed in OpenAPI by the report module alone: every field of the report and
    of each of its parts is listed (a field added there is here with no other edit)."""
    from worker.engine.contract import report

    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"$ref": "#/components/schemas/Report"} in schemas["JobOut"]["properties"]["result"]["anyOf"]
    parts = [
        m for m in vars(report).values() if isinstance(m, type) and issubclass(m, report.Part) and m is not report.Part
    ]
    assert len(parts) > 10
    for part in parts:
        assert set(schemas[part.__name__]["properties"]) == {f.alias or n for n, f in part.model_fields.items()}, part


# --- 422s on POST /jobs ---------------------------------------------------------------------

BAD_SPECS = [
    ({"method": "obs"}, "'sparsegpt', 'wanda', 'magnitude' or 'ria'"),
    ({"sparsity": "3:2"}, "0 < N < M"),
    ({"sparsity": "2:256"}, "at most 128"),
    ({"sparsity": 1.5}, "strictly between 0 and 1"),
    ({"sparsity": 0}, "sparsity 0 prunes nothing: set quantization"),  # 0: quantization only (issue 26)
    ({"sparsity": "half"}, "neither a ratio"),
    ({"sparsity": True}, "neither a ratio"),
    ({"calibration": {"nsamples": 0}}, "Must be at least 1"),
    ({"calibration": {"nsamples": 100_000}}, "above this server's limit of 512"),
    ({"calibration": {"seqlen": 4}}, "Must be at least 8"),
    ({"calibration": {"seqlen": 100_000}}, "above this server's limit of 4096"),
    ({"calibration": {"dataset": "imagenet"}}, "use one of c4, wikitext2, ptb"),
    ({"calibration": {"dataset": "upload:999999"}}, "no such calibration set"),
    ({"calibration": {"dataset": "/etc/passwd"}}, "outside the server's allowed directories"),
    ({"calibration": {"dataset": "/etc/../etc/passwd"}}, "outside the server's allowed directories"),
    ({"evaluation": {"datasets": ["/etc/hostname"]}}, "outside the server's allowed directories"),
    ({"evaluation": {"datasets": ["wikitext2", "wikitext2"]}}, "must not repeat"),
    ({"evaluation": {"datasets": ["c4", "ptb", "wikitext2", "upload:1"]}}, "at most 3 evaluation sets"),
    ({"evaluation": {"max_windows": 0}}, "Must be at least 1"),
    ({"model": "/etc"}, "outside the server's allowed directories"),
    ({"model": "../models/llama"}, "absolute path"),
    ({"model": "a/b/c/d"}, "not a Hugging Face model id"),
    ({"model": ""}, "Is required"),
    ({"revision": "../../x"}, "branch, tag or commit"),
    ({"trust_remote_code": True}, "trust_remote_code is refused"),
    ({"solver": {"blocksize": 6}}, "multiple of M=4"),
    ({"solver": {"percdamp": 0}}, "Must be more than 0"),
    ({"solver": {"wbits": 1}}, "Must be at least 2"),
    ({"method": "magnitude", "solver": {"wbits": 4}}, "method sparsegpt only"),
    ({"method": "wanda", "solver": {"exact": True}}, "solver.exact reproduces the reference"),
    ({"dtype": "int8"}, "'auto', 'float16', 'bfloat16' or 'float32'"),
    ({"colour": "blue"}, "Extra inputs are not permitted"),
]


@pytest.mark.parametrize("change,message", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_spec_is_422(client, models_dir, change, message):
    body = spec(models_dir)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    before = client.get("/api/v1/jobs").json()["total"]
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert message in messages(response)
    assert client.get("/api/v1/jobs").json()["total"] == before  # nothing was stored


def test_local_paths_missing_or_escaping_by_symlink(client, models_dir, tmp_path):
    assert "not a directory" in messages(
        client.post("/api/v1/jobs", json=spec(models_dir, model=str(models_dir / "nope")))
    )
    escape = models_dir / f"escape-{secrets.token_hex(3)}"
    escape.symlink_to(tmp_path)
    response = client.post("/api/v1/jobs", json=spec(models_dir, model=str(escape)))
    assert response.status_code == 422 and "outside the server's allowed directories" in messages(response)


def test_missing_fields_and_bad_json(client):
    response = client.post("/api/v1/jobs", json={"model": "a/b"})
    assert response.status_code == 422 and "Is required" in messages(response)
    response = client.post("/api/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert client.post("/api/v1/jobs", json=["a", "b"]).status_code == 422


# --- other 4xx -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path,code",
    [
        ("GET", "/api/v1/jobs/999999", 404),
        ("GET", "/api/v1/jobs/abc", 422),
        ("GET", "/api/v1/jobs/0", 422),
        ("GET", "/api/v1/jobs/99999999999999", 422),
        ("POST", "/api/v1/jobs/999999/cancel", 404),
        ("GET", "/api/v1/jobs/999999/artifact", 404),
        ("GET", "/api/v1/jobs/999999/events", 404),
        ("GET", "/api/v1/jobs?status=bogus", 422),
        ("GET", "/api/v1/jobs?limit=0", 422),
        ("GET", "/api/v1/jobs?limit=1000", 422),
        ("GET", "/api/v1/jobs?offset=-1", 422),
        ("DELETE", "/api/v1/jobs", 405),
    ],
)
def test_other_4xx(client, method, path, code):
    response = client.request(method, path)
    assert response.status_code == code, response.text
    assert "detail" in response.json()


def test_artifact_409_while_queued_and_bad_last_event_id(client, models_dir):
    job_id = client.post("/api/v1/jobs", json=spec(models_dir)).json()["id"]
    response = client.get(f"/api/v1/jobs/{job_id}/artifact")
    assert response.status_code == 409 and "queued" in response.json()["detail"]
    response = client.get(f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "not-an-id"})
    assert response.status_code == 422


# --- uploads ---------------------------------------------------------------------------------


def _leftovers(client) -> list[str]:
    uploads = client.app.state.settings.uploads_dir
    return [p.name for p in uploads.glob(".upload-*")] if uploads.exists() else []


def test_upload_listed_and_usable(client, upload):
    assert upload["format"] == "txt" and upload["ref"] == f"upload:{upload['id']}" and len(upload["sha256"]) == 64
    listed = client.get("/api/v1/calibration-sets").json()["items"]
    assert upload["id"] in [item["id"] for item in listed]


def test_upload_jsonl(client):
    body = b'{"text": "one line of text"}\n\n{"text": "another", "meta": 1}\n'
    response = client.post("/api/v1/calibration-sets", files={"file": ("../../etc/evil name.jsonl", body)})
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "jsonl" and response.json()["name"] == "evil_name.jsonl"
    assert response.json()["size"] == len(body)


@pytest.mark.parametrize(
    "filename,content,code,message",
    [
        ("model.bin", b"abc", 422, ".txt (plain text) or .jsonl"),
        ("noext", b"abc", 422, ".txt (plain text) or .jsonl"),
        ("bad.jsonl", b'{"text": "ok"}\nnot json\n', 422, "line 2 is not JSON"),
        ("bad.jsonl", b'{"words": "no text key"}\n', 422, 'no "text" string'),
        ("bin.txt", b"\xff\xfe\x00binary", 422, "not UTF-8"),
        ("empty.txt", b"\n  \n", 422, "holds no text"),
    ],
)
def test_upload_rejected(client, filename, content, code, message):
    response = client.post("/api/v1/calibration-sets", files={"file": (filename, content)})
    assert response.status_code == code, response.text
    assert message in response.json()["detail"]
    assert _leftovers(client) == []


def test_upload_without_file_field_or_multipart(client):
    response = client.post("/api/v1/calibration-sets", files={"other": ("a.txt", b"hello")})
    assert response.status_code == 422 and "field named 'file'" in response.json()["detail"]
    response = client.post("/api/v1/calibration-sets", content=b"hello", headers={"content-type": "text/plain"})
    assert response.status_code == 415


def test_upload_over_limit_declared(client):
    response = client.post("/api/v1/calibration-sets", files={"file": ("big.txt", b"a" * (UPLOAD_LIMIT + 100_000))})
    assert response.status_code == 413 and str(UPLOAD_LIMIT) in response.json()["detail"]
    assert _leftovers(client) == []


def test_upload_over_limit_while_streaming(client):
    """No Content-Length (chunked): the cap holds on the bytes as they arrive."""
    boundary = "sparsegpt-test-boundary"
    sent = {"bytes": 0}

    def body():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n'
            "Content-Type: text/plain\r\n\r\n"
        ).encode()
        yield head
        chunk = b"x" * 16384
        for _ in range((UPLOAD_LIMIT // len(chunk)) * 4):
            sent["bytes"] += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/api/v1/calibration-sets",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 413, response.text
    assert "upload limit" in response.json()["detail"]
    assert _leftovers(client) == []
    before = {p.name for p in client.app.state.settings.uploads_dir.iterdir()}
    assert not any(name.startswith("big") for name in before)


def test_upload_exactly_at_limit_is_accepted(client):
    content = (b"word " * (UPLOAD_LIMIT // 5 + 1))[:UPLOAD_LIMIT]
    response = client.post("/api/v1/calibration-sets", files={"file": ("edge.txt", content)})
    assert response.status_code == 201, response.text
    assert response.json()["size"] == UPLOAD_LIMIT
