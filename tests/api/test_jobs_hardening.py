"""Jobs over real HTTP against real processes (issue 11, items 8 and 15).

- Idempotency during a broker outage: POST /jobs answered 503 "try again" when Redis was down,
  but the committed row kept the Idempotency-Key and was marked failed, so the retry with the
  same key replayed a failed job. Now the row whose run message never went out is taken back:
  the retry queues the job, and it runs once.
- Ids are never reused (SQLite reused the id of a deleted newest job: another user's job then
  answered at the old id, and the old id's Redis stream could replay for it).
"""

from __future__ import annotations

import uuid

import pytest
import redis

from app import streams
from tests.support.stacks import SMALL, job_body

pytestmark = pytest.mark.slow


def queued_messages(url: str, queue: str) -> list[str]:
    return [m.decode(errors="replace") for m in redis.Redis.from_url(url).lrange(queue, 0, -1)]


def test_a_retry_after_a_broker_outage_queues_the_job(make_stack, redis_server, models_dir):
    stack = make_stack(redis_server.url)
    stack.start_api()
    body = job_body(models_dir)
    key = {"Idempotency-Key": f"outage-{uuid.uuid4()}"}
    with stack.client(timeout=60) as client:
        before = client.get("/api/v1/jobs").json()["total"]  # the stack's database is shared by the session
        redis_server.kill()
        refused = client.post("/api/v1/jobs", json=body, headers=key)
        assert refused.status_code == 503, refused.text
        assert "try again" in refused.json()["detail"] and refused.headers.get("retry-after")
        assert client.get("/api/v1/jobs").json()["total"] == before, "nothing was queued, and nothing is left behind"

        redis_server.start()  # the same port, empty (nothing saved)
        retried = client.post("/api/v1/jobs", json=body, headers=key)
        assert retried.status_code == 201, retried.text
        job = retried.json()
        assert job["status"] == "queued" and job["error"] is None
        messages = queued_messages(redis_server.url, stack.env["SPARSEGPT_QUEUE"])
        assert len(messages) == 1 and f"job-{job['id']}-" in messages[0], messages

        again = client.post("/api/v1/jobs", json=body, headers=key)  # the key now names the queued job
        assert again.status_code == 200 and again.json()["id"] == job["id"]
        assert client.get("/api/v1/jobs").json()["total"] == before + 1

        stack.start_worker("after-outage")
        done = stack.wait(job["id"])
        assert done["status"] == "succeeded" and done["attempt"] == 1, done
        assert client.get("/api/v1/jobs").json()["total"] == before + 1


def test_a_deleted_jobs_id_is_never_reused(service, models_dir):
    """On SQLite and PostgreSQL: delete the newest job, create another: a new id, the old one
    404, and the old id's Redis keys gone with it."""
    client = service.client
    r = redis.Redis.from_url(service.env["REDIS_URL"])
    body = job_body(
        models_dir, calibration={"dataset": str(models_dir / "calib.txt"), **SMALL}, evaluation={"datasets": []}
    )
    first = client.post("/api/v1/jobs", json=body)
    assert first.status_code == 201, first.text
    old = first.json()["id"]
    assert service.wait_done(old)["status"] == "succeeded"
    assert r.exists(streams.stream_key(old)), "the finished job's events are in Redis"
    assert client.get("/api/v1/jobs").json()["items"][0]["id"] == old, "the deleted job is the newest"

    assert client.delete(f"/api/v1/jobs/{old}").status_code == 204
    assert client.get(f"/api/v1/jobs/{old}").status_code == 404
    assert r.exists(streams.stream_key(old), streams.state_key(old), streams.cancel_key(old)) == 0

    second = client.post("/api/v1/jobs", json=body)
    assert second.status_code == 201, second.text
    new = second.json()["id"]
    assert new > old
    assert client.get(f"/api/v1/jobs/{old}").status_code == 404
    assert client.get(f"/api/v1/jobs/{old}/events").status_code == 404
    assert service.wait_done(new)["status"] == "succeeded"
    assert client.get(f"/api/v1/jobs/{old}").status_code == 404


def test_a_replay_of_a_job_still_being_queued_waits(make_stack, redis_server, models_dir):
    """A twin request with the same key, between the first one's commit and its run message
    (which may yet fail and take the row back), is told to come again instead of getting a job
    that could vanish; once the message is out, the replay is the job."""
    from app import auth, crud, db
    from app.services.jobs import spec_digest
    from worker.engine.contract.spec import JobSpec

    stack = make_stack(redis_server.url)
    stack.start_api()
    body, key = job_body(models_dir), f"twin-{uuid.uuid4()}"
    url = stack.env["DATABASE_URL"]
    with db.session_scope(url) as session:  # the first request's row, committed, its message not sent yet
        user = crud.get_user_by_token_hash(session, auth.hash_token(stack.token))
        job_id = crud.create_job(
            session,
            spec=JobSpec.model_validate(body).model_dump(mode="json"),
            owner_id=user.id,
            idempotency_key=key,
            spec_sha256=spec_digest(JobSpec.model_validate(body)),
        ).id
    with stack.client() as client:
        twin = client.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": key})
        assert twin.status_code == 409 and twin.headers.get("retry-after"), twin.text
        assert "still queueing" in twin.json()["detail"]
        with db.session_scope(url) as session:  # the first request's message went out
            crud.set_task_id(session, job_id=job_id, task_id=f"job-{job_id}-sent")
        replay = client.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": key})
        assert replay.status_code == 200 and replay.json()["id"] == job_id, replay.text


@pytest.mark.slow
def test_a_hung_broker_answers_503_and_the_key_waits_for_it(make_stack, redis_server, models_dir):
    """Redis frozen (SIGSTOP): the POST's send times out (503, nothing queued) instead of hanging,
    and a twin with the same key meanwhile gets 409, never the row that is about to go."""
    import signal
    import threading
    import time

    stack = make_stack(redis_server.url)
    stack.start_api()
    body = job_body(models_dir)
    key = {"Idempotency-Key": f"hung-{uuid.uuid4()}"}
    with stack.client(timeout=120) as client:
        before = client.get("/api/v1/jobs").json()["total"]
        results = {}
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            first = threading.Thread(
                target=lambda: results.update(first=client.post("/api/v1/jobs", json=body, headers=key))
            )
            started = time.monotonic()
            first.start()
            time.sleep(3)
            twin = client.post("/api/v1/jobs", json=body, headers=key)
            # never the row that is about to go: 409 while the first is sending, or (when the first is still
            # routing, which reads the live workers from the frozen Redis, and has no row yet) the same 503
            assert twin.status_code in (409, 503) and twin.headers.get("retry-after"), twin.text
            assert twin.status_code == 409 or "nothing was queued" in twin.text, twin.text
            first.join(90)
            took = time.monotonic() - started
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        assert results["first"].status_code == 503, results["first"].text
        assert took < 60, f"the send hung {took:.0f} s"
        assert client.get("/api/v1/jobs").json()["total"] == before
        again = client.post("/api/v1/jobs", json=body, headers=key)
        assert again.status_code == 201, again.text
