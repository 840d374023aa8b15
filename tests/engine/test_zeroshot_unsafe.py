"""Tasks that run the model's generated code (lm-eval's ``unsafe_code``: humaneval, mbpp, and
groups holding them) are refused from the harness's task index, before ``TaskManager.load``
imports their code (humaneval's metric module, which loads a Hub metric): checked in a fresh
interpreter, which must not have imported any of the task's modules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.paths import REPO

pytest.importorskip("lm_eval")

PROBE = """
import json, sys
from worker.engine.zeroshot import ZeroShot
from worker.engine.errors import InvalidJob
try:
    ZeroShot(sys.argv[1].split(","), limit=2, batch_size=1).prepare()
    outcome = "prepared"
except InvalidJob as exc:
    outcome = "refused: " + str(exc)
except Exception as exc:
    outcome = type(exc).__name__ + ": " + str(exc)
loaded = sorted(m for m in sys.modules if m.startswith("lm_eval.tasks.") and m.count(".") >= 3 or m == "evaluate")
print(json.dumps({"outcome": outcome, "loaded": loaded}))
"""


@pytest.mark.parametrize(
    "names, unsafe", [("humaneval", "humaneval"), ("arc_easy,humaneval_infilling", "humaneval_multi_line_infilling")]
)
def test_unsafe_tasks_are_refused_before_their_code_is_imported(names, unsafe):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, names],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"].startswith("refused: evaluation.tasks: "), result
    assert unsafe in result["outcome"] and "run the model's generated code" in result["outcome"], result
    assert result["loaded"] == [], result
