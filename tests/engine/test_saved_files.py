"""What ``sparsegpt prune`` leaves behind for people: progress lines in a log, files teammates can read."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from tests.support.paths import REPO
from tests.support.tiny_models import make_tiny_model, sample_text

SPARSEGPT = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    make_tiny_model(d / "model", "llama", blocks=3)
    (d / "cal.txt").write_text(sample_text(), encoding="utf-8")
    return d


def prune(files, out, log, umask: int):
    """The CLI with its stderr in a file (no terminal), under ``umask``."""
    with open(log, "w") as err:
        return subprocess.run(
            [
                *SPARSEGPT,
                "prune",
                str(files / "model"),
                "--sparsity",
                "0.5",
                "--calibration",
                str(files / "cal.txt"),
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--eval",
                str(files / "cal.txt"),
                "--eval-windows",
                "2",
                "--device",
                "cpu",
                "--output",
                str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=ENV,
            timeout=300,
            cwd=REPO,
            preexec_fn=lambda: os.umask(umask),
        )


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_follow_the_umask_and_a_log_gets_progress_lines(files, tmp_path, umask):
    out, log = tmp_path / "pruned", tmp_path / "stderr.log"
    result = prune(files, out, log, umask)
    text = log.read_text()
    assert result.returncode == 0, text
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == want, f"{path.name}: {oct(mode)}, want {oct(want)} under umask {oct(umask)}"
    lines = text.splitlines()
    for i in (1, 2, 3):  # one line per block while pruning, none of tqdm's carriage returns
        assert any(line.startswith("pruning") and f"block {i}/3" in line for line in lines), text
    assert "\r" not in text
    stages = [line.split()[0] for line in lines if line.strip()]
    assert "saving" in stages and stages.index("pruning") < stages.index("saving")
    assert all("elapsed" in line for line in lines if line.split()[0] in ("pruning", "saving"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["MODEL", "--calibration", "/nonexistent/cal.txt"], "--calibration '/nonexistent/cal.txt' does not exist"),
        (["MODEL", "--calibration", "CAL", "--eval", "missing-eval.txt"], "--eval"),
        (["/no/such/model", "--calibration", "CAL"], "model '/no/such/model' does not exist"),
        (["MODEL", "--calibration", "CAL", "--output", "MODEL"], "exists and is not empty"),
    ],
)
def test_the_cli_checks_every_path_before_it_loads_anything(files, args, message):
    import time

    args = [str(files / "model") if a == "MODEL" else str(files / "cal.txt") if a == "CAL" else a for a in args]
    t0 = time.monotonic()
    result = subprocess.run(
        [*SPARSEGPT, "prune", *args, "--device", "cpu"], capture_output=True, text=True, env=ENV, timeout=120, cwd=REPO
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - t0 < 60


def test_on_a_machine_without_the_hub_the_clis_defaults_say_what_to_give(files, tmp_path):
    """Offline, with an empty Hugging Face cache: the default calibration set (c4) is an error naming
    --calibration, an --eval wikitext2 the user named is an error, and the default evaluation set is
    left out with a note (the run goes on and measures no perplexity)."""
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "empty-hub-cache"), "HF_HOME": str(tmp_path / "hf-home")}

    def run(*args):
        return subprocess.run(
            [*SPARSEGPT, "prune", str(files / "model"), *args, "--nsamples", "4", "--seqlen", "32", "--device", "cpu"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            cwd=REPO,
        )

    no_calibration = run()
    assert no_calibration.returncode == 2, no_calibration.stderr
    assert "no --calibration given, and its default, c4, cannot be loaded here" in no_calibration.stderr
    named = run("--calibration", str(files / "cal.txt"), "--eval", "wikitext2")
    assert named.returncode == 2 and "--eval wikitext2: the wikitext2 dataset" in named.stderr, named.stderr
    report = tmp_path / "report.json"
    default_eval = run("--calibration", str(files / "cal.txt"), "--report", str(report))
    assert default_eval.returncode == 0, default_eval.stderr
    assert "note: no --eval given and its default, wikitext2, cannot be loaded here" in default_eval.stderr
    import json

    assert json.loads(report.read_text())["perplexity"] in ({}, None)
