"""The worker's Redis progress reporter publishes no path of the server: an absolute path left in an
event's message is cut to its last part, in the stream (SSE), the latest-state key and the snapshot."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from app import streams
from worker.reporter import RedisProgress, without_paths


def test_the_redis_reporter_publishes_no_server_path():
    client = redis.Redis.from_url("redis://127.0.0.1:6379/11")
    job_id = 10**9 + uuid.uuid4().int % 10**6  # no real job's stream
    reporter = RedisProgress(client, job_id, 1, maxlen=100, ttl_s=60)
    try:
        reporter.progress(
            {
                "stage": "loading",
                "layer": None,
                "layers": None,
                "module": None,
                "fraction": 0.0,
                "eta_s": None,
                "elapsed_s": 0.1,
                "message": "loading /srv/models/org/llama-7b",
            }
        )
        [(_, fields)] = client.xrange(streams.stream_key(job_id))
        published = json.loads(fields[b"data"])
        assert published["message"] == "loading llama-7b" == reporter.snapshot()["message"]
        assert json.loads(client.get(streams.state_key(job_id)))["message"] == "loading llama-7b"
    finally:
        client.delete(streams.stream_key(job_id), streams.state_key(job_id))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("loading /srv/models/llama", "loading llama"),
        ("from /a/b/c.txt, then /x/", "from c.txt, then x"),
        ("block 2/4", "block 2/4"),
        ("ratio 3 / 4", "ratio 3 / 4"),
        ("model.layers.0.q_proj", "model.layers.0.q_proj"),
    ],
)
def test_without_paths(text, expected):
    assert without_paths(text) == expected
