"""A Hub model's config.json, read before a job is queued for its memory estimate
(``worker.engine.contract.estimate.hub_config``, called in the API's request threads): one bounded GET, at
most ``HUB_MAX_FETCHES`` at once, never longer than its deadline, at most 4 MB, cached.

huggingface_hub's download retried a timed-out request with 60 s timeouts (390 s for one job's
POST); 45 such POSTs with the Hub unreachable filled the API's thread pool (/health unanswered).
A real HTTP server on loopback stands in for the Hub (HF_ENDPOINT): one that never answers, one
whose body never ends, one that serves a config."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.services import model_config as est

CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 1000,
}


class StandIn:
    """The stand-in Hub: ``mode`` is hang | endless | serve | missing; records each request."""

    def __init__(self) -> None:
        self.mode = "serve"
        self.requests: list[tuple[str, str | None]] = []
        self.release = threading.Event()
        self.broken_off = threading.Event()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                stand_in.requests.append((self.path, self.headers.get("Authorization")))
                if stand_in.mode == "hang":
                    stand_in.release.wait(60)  # never answers (closed at teardown)
                elif stand_in.mode == "missing":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif stand_in.mode == "endless":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()  # no Content-Length: the body ends when the connection does
                    try:
                        self.wfile.write(b'{"hidden_size": ' + b" " * 1000)
                        while not stand_in.release.is_set():
                            self.wfile.write(b" " * 65536)
                    except OSError:
                        stand_in.broken_off.set()
                else:
                    data = json.dumps(CONFIG).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def seen(self, count: int, within: float = 5.0) -> bool:
        end = time.monotonic() + within
        while len(self.requests) < count and time.monotonic() < end:
            time.sleep(0.02)
        return len(self.requests) >= count


@pytest.fixture
def hub(monkeypatch) -> Iterator[StandIn]:
    stand_in = StandIn()
    threading.Thread(target=stand_in.server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    est._hub_cache.clear()
    try:
        yield stand_in
    finally:
        stand_in.release.set()
        stand_in.server.shutdown()
        stand_in.server.server_close()
        for thread in threading.enumerate():  # the fetches still under way end (their slots freed)
            if thread.name.startswith("hub_config"):
                thread.join(15)
        est._hub_cache.clear()


def test_a_hub_that_never_answers_is_given_up_within_the_deadline(hub):
    hub.mode = "hang"
    start = time.monotonic()
    assert est.hub_config("org/hangs", None) is None
    elapsed = time.monotonic() - start
    assert hub.requests == [("/org/hangs/resolve/main/config.json", None)]  # it was asked, once
    assert elapsed < est.HUB_TIMEOUT_S + 1.5, elapsed


def test_with_every_fetch_slot_taken_the_estimate_is_skipped_at_once(hub):
    """HUB_MAX_FETCHES requests hang: the next job's does not wait (left to the worker) and
    does not reach the Hub."""
    hub.mode = "hang"
    slots = getattr(est, "HUB_MAX_FETCHES", 4)
    waiting = [threading.Thread(target=est.hub_config, args=(f"org/busy-{n}", None), daemon=True) for n in range(slots)]
    for thread in waiting:
        thread.start()
    assert hub.seen(slots), hub.requests
    start = time.monotonic()
    assert est.hub_config("org/one-more", None) is None
    assert time.monotonic() - start < 0.5
    time.sleep(0.2)
    assert len(hub.requests) == slots and "org/one-more" not in str(hub.requests)
    for thread in waiting:
        thread.join(est.HUB_TIMEOUT_S + 2)
        assert not thread.is_alive()


def test_an_endless_config_is_cut_off_at_4_mb(hub):
    hub.mode = "endless"
    start = time.monotonic()
    assert est.hub_config("org/endless", "v1.0") is None
    assert time.monotonic() - start < 3
    assert hub.requests[0][0] == "/org/endless/resolve/v1.0/config.json"
    assert hub.broken_off.wait(5)  # the reader hung up: the server's writes fail


def test_a_config_is_read_once_and_cached(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert est.hub_config("org/model", None) == CONFIG
    assert est.hub_config("org/model", None) == CONFIG
    assert hub.requests == [("/org/model/resolve/main/config.json", "Bearer hf_test")]
    # a revision with a slash is one path segment
    assert est.hub_config("org/model", "refs/pr/1") == CONFIG
    assert hub.requests[-1][0] == "/org/model/resolve/refs%2Fpr%2F1/config.json"


def test_a_failure_is_cached_briefly(hub, monkeypatch):
    hub.mode = "missing"
    assert est.hub_config("org/absent", None) is None
    assert est.hub_config("org/absent", None) is None
    assert len(hub.requests) == 1
    monkeypatch.setattr(est, "HUB_FAILURE_CACHE_S", 0.0)
    hub.mode = "serve"
    assert est.hub_config("org/absent", None) == CONFIG
    assert len(hub.requests) == 2


def test_offline_nothing_is_fetched(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert est.hub_config("org/model", None) is None
    assert est.hub_config("../../etc", None) is None
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert est.hub_config("../../etc", None) is None  # not a repo id: not asked either
    time.sleep(0.1)
    assert hub.requests == []
