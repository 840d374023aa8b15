"""Failing fast and clearly: argument errors before torch loads, a Hub that cannot be reached
answered in seconds with what to do (the CLI and a job's failure reason), a cached model read
from the cache without the network."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.support.paths import REPO
from tests.support.tiny_models import make_tiny_model, sample_text

SPARSEGPT = [sys.executable, "-m", "app.cli"]
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again once the block ends: connections are refused


@pytest.fixture
def silent_endpoint():
    """A server that accepts connections and never answers (a network that drops packets)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def online_env(tmp_path, endpoint: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in OFFLINE_VARS and not k.startswith("SPARSEGPT_") and k != "HF_HUB_CACHE"
    }  # HF_HOME's own cache
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), TOKENIZERS_PARALLELISM="false")
    return env


# the CLI's progress lines in a log (worker.engine.progress.line_reporter): a stage, then its times
PROGRESS = re.compile(r"^(loading|calibrating|pruning|evaluating|saving)\s.*\belapsed\b")


def problems(stderr: str) -> list[str]:
    """stderr's lines but the CLI's own progress lines (which a log gets instead of a bar)."""
    return [line for line in stderr.splitlines() if not PROGRESS.match(line)]


def run(args, env, timeout=120):
    t0 = time.monotonic()
    result = subprocess.run(
        [*SPARSEGPT, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    return result, time.monotonic() - t0


@pytest.fixture(scope="module")
def floor(tmp_path_factory) -> float:
    """Seconds the CLI needs to fail with no network involved at all (HF_HUB_OFFLINE, a model not
    in the cache): Python, torch and transformers starting. On an idle machine a few seconds; the
    limits below are 10 s (1 s for argument errors) unless this floor says the machine is loaded."""
    tmp = tmp_path_factory.mktemp("floor")
    (tmp / "cal.txt").write_text(sample_text(4000), encoding="utf-8")
    env = {**online_env(tmp, "http://127.0.0.1:9"), "HF_HUB_OFFLINE": "1"}
    result, seconds = run(
        ["prune", "someorg/some-model", "--sparsity", "0.5", "--calibration", tmp / "cal.txt", "--no-eval"], env
    )
    assert result.returncode == 2, result.stderr
    print(f"floor: {seconds:.1f} s to fail offline without any network")
    return seconds


def within(seconds: float, floor: float) -> bool:
    """Under 10 s, or (on a loaded machine) under the no-network floor plus the probe's 4 s and 2 s."""
    return seconds < max(10.0, floor + 6.0)


@pytest.mark.parametrize("where", ["closed port", "silent server"])
def test_unreachable_hub_fails_in_seconds_with_what_to_do(tmp_path, silent_endpoint, where, floor):
    endpoint = f"http://127.0.0.1:{_closed_port()}" if where == "closed port" else silent_endpoint
    (tmp_path / "cal.txt").write_text(sample_text(4000), encoding="utf-8")
    result, seconds = run(
        ["prune", "someorg/some-model", "--sparsity", "0.5", "--calibration", tmp_path / "cal.txt", "--no-eval"],
        online_env(tmp_path, endpoint),
    )
    assert result.returncode == 2, result.stderr
    print(f"{where}: {seconds:.1f} s to the one-line error (floor {floor:.1f} s)")
    assert within(seconds, floor), f"took {seconds:.1f} s (floor {floor:.1f} s)"
    [line] = problems(result.stderr)  # one line: no retry warnings, no progress bar
    assert line.startswith(
        "sparsegpt prune: error: model 'someorg/some-model' is not in this machine's Hugging Face cache"
    )
    assert "HF_HUB_OFFLINE=1" in line and "local model directory" in line and endpoint in line


def test_a_builtin_dataset_without_the_hub_fails_before_the_model_loads(tmp_path, silent_endpoint, floor):
    model = make_tiny_model(tmp_path / "model")
    result, seconds = run(
        ["prune", model, "--sparsity", "0.5", "--calibration", "c4", "--no-eval"], online_env(tmp_path, silent_endpoint)
    )
    assert result.returncode == 2 and within(seconds, floor), (seconds, floor, result.stderr)
    [line] = problems(result.stderr)
    assert "the c4 dataset comes from the Hugging Face Hub" in line and "local text file" in line


def test_offline_mode_and_a_model_not_in_the_cache(tmp_path, floor):
    env = {**online_env(tmp_path, "http://127.0.0.1:9"), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "cal.txt").write_text(sample_text(4000), encoding="utf-8")
    result, seconds = run(
        ["prune", "someorg/some-model", "--sparsity", "0.5", "--calibration", tmp_path / "cal.txt", "--no-eval"], env
    )
    assert result.returncode == 2 and within(seconds, floor)
    [line] = problems(result.stderr)
    assert "HF_HUB_OFFLINE is set" in line and "hf download someorg/some-model" in line


def test_a_cached_model_loads_without_the_hub(tmp_path):
    """The Hub unreachable, the model in the HF cache: it is read from there, without retries."""
    snapshot = tmp_path / "hf-home" / "hub" / "models--someorg--tiny" / "snapshots" / ("a" * 40)
    make_tiny_model(tmp_path / "src")
    shutil.copytree(tmp_path / "src", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    (tmp_path / "cal.txt").write_text(sample_text(8000), encoding="utf-8")
    result, seconds = run(
        [
            "prune",
            "someorg/tiny",
            "--sparsity",
            "0.5",
            "--calibration",
            tmp_path / "cal.txt",
            "--nsamples",
            2,
            "--seqlen",
            16,
            "--no-eval",
            "--device",
            "cpu",
            "--quiet",
        ],
        online_env(tmp_path, f"http://127.0.0.1:{_closed_port()}"),
    )
    assert result.returncode == 0, result.stderr
    assert "Retrying" not in result.stderr and "sparsity 0.5" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--sparsity", "1.5"],
        ["--sparsity", "3:2"],
        ["--nsamples", "0"],
        ["--sparsity", "0.5", "--method", "nope"],
        ["--sparsity", "0.5", "--blocksize", "x"],
    ],
)
def test_argument_errors_are_one_line_in_under_a_second(args, floor):
    result, seconds = run(["prune", "someorg/some-model", *args], {**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    [line] = problems(result.stderr)
    assert line.startswith("sparsegpt prune: error: ") and "\r" not in result.stderr and "%|" not in result.stderr
    print(f"{args}: refused in {seconds:.2f} s (floor {floor:.1f} s)")
    assert seconds < max(1.0, floor / 4), f"{seconds:.2f} s to refuse {args} (floor {floor:.1f} s)"
    # and, whatever the machine's load: refused before torch (or transformers) was imported
    code = (
        "import sys; from worker.engine.cli import main\ntry: main(sys.argv[1:])\nexcept SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    check = subprocess.run(
        [sys.executable, "-c", code, "someorg/some-model", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert check.stdout.strip().splitlines()[-1] == "[]", check.stdout + check.stderr


@pytest.mark.slow
def test_a_job_the_hub_cannot_serve_is_refused_at_submit_saying_what_to_do(
    make_stack, module_redis, models_dir, tmp_path, floor
):
    """The API sees the Hub unreachable and the model not in its cache: a 422 in seconds, with what to
    do, instead of a queued job that fails later (the worker's own check says the same: the CLI tests)."""
    stack = make_stack(module_redis.url)
    for name in (*OFFLINE_VARS, "HF_HUB_CACHE"):
        stack.env.pop(name, None)
    stack.env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf-home"))
    stack.start_api()
    with stack.client() as c:
        before = c.get("/api/v1/jobs").json()["total"]  # (the stack's database is shared with other tests)
        t0 = time.monotonic()
        response = c.post(
            "/api/v1/jobs",
            json={
                "model": "someorg/some-model",
                "sparsity": 0.5,
                "calibration": {"dataset": str(models_dir / "calib.txt"), "nsamples": 4, "seqlen": 32},
                "evaluation": {"datasets": []},
            },
        )
        took = time.monotonic() - t0
        assert response.status_code == 422, response.text
        assert c.get("/api/v1/jobs").json()["total"] == before  # nothing was queued
    error = response.json()["detail"][0]["msg"]
    assert "HF_HUB_OFFLINE=1" in error and "local model directory" in error, error
    assert within(took, floor), (took, floor)


def test_hub_warnings_print_once():
    """huggingface_hub's own handler and the root logger's printed each warning twice."""
    code = (
        "import logging, sys; logging.basicConfig(format='%(levelname)s %(name)s: %(message)s'); "
        "from huggingface_hub.utils import logging as hub_logging; from worker.engine.contract import hub; "
        "hub.one_copy_of_hub_logs() if sys.argv[1] == 'fixed' else None; "
        "hub_logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')"
    )
    counts = {}
    for mode in ("fixed", "as-is"):
        result = subprocess.run(
            [sys.executable, "-c", code, mode], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        counts[mode] = result.stderr.count("Retrying in 1s")
    assert counts == {"fixed": 1, "as-is": 2}


def test_a_hub_answering_503_is_not_retried_for_a_minute(tmp_path, floor):
    import http.server
    import threading

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(503)
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "cal.txt").write_text(sample_text(4000), encoding="utf-8")
        result, seconds = run(
            ["prune", "someorg/some-model", "--sparsity", "0.5", "--calibration", tmp_path / "cal.txt", "--no-eval"],
            online_env(tmp_path, f"http://127.0.0.1:{server.server_address[1]}"),
        )
    finally:
        server.shutdown()
    assert result.returncode == 2 and within(seconds, floor), (seconds, floor, result.stderr)
    [line] = problems(result.stderr)
    assert "answers HTTP 503" in line and "HF_HUB_OFFLINE=1" in line
