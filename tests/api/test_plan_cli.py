"""``sparsegpt plan`` as a person runs it, against the real service (API + worker, SQLite and
PostgreSQL): it submits, follows the plan (--wait), prints the table whose figures are the API's,
writes the CSV the API serves (--csv), and refuses bad input in one line (no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.paths import REPO

pytestmark = pytest.mark.slow


def run_plan(service, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**service.env, "SPARSEGPT_URL": service.base}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "plan", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def common(models_dir) -> list[str]:
    data = str(models_dir / "calib.txt")
    return [
        str(models_dir / "llama"),
        *("--calibration", data, "--nsamples", "4", "--seqlen", "32"),
        *("--eval", data, "--eval-windows", "2", "--dtype", "float32"),
    ]


def test_plan_wait_prints_the_table_and_writes_the_csv(service, models_dir, tmp_path):
    out = tmp_path / "plan.csv"
    result = run_plan(
        service,
        *common(models_dir),
        *("--sparsities", "0,0.5", "--quantize", "none,W4A16", "--group-size", "32", "--name", "cli plan"),
        *("--wait", "--csv", str(out)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("plan ") and f"{service.base}/plans/" in first and "3 job(s)" in first
    plan_id = int(first.split()[1].rstrip(":"))
    plan = service.client.get(f"/api/v1/plans/{plan_id}").json()
    assert plan["status"] == "succeeded" and plan["name"] == "cli plan"
    lines = result.stdout.splitlines()
    assert lines[1].split()[:2] == ["setting", "status"]
    for row in plan["points"][1:]:  # each job's row: its status, id and perplexity as the API has them
        line = next(x for x in lines if f"#{row['job_id']}" in x)
        assert "succeeded" in line and f"{row['perplexity']:.3f}" in line
    assert any(x.strip().startswith("dense model") for x in lines)
    if plan["recommended"]:
        assert any(x.startswith("* ") for x in lines)
        assert f"recommended: {plan['recommended']['key']}" in result.stdout
    else:
        assert "nothing recommended" in result.stdout
    assert out.read_bytes() == service.client.get(f"/api/v1/plans/{plan_id}/table.csv").content
    assert "Traceback" not in result.stderr


def test_plan_json_without_wait_and_one_line_refusals(service, models_dir):
    refused = run_plan(service, *common(models_dir), "--sparsities", "32:64", "--json")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("sparsegpt plan: error: the server refused")
    assert "M=64" in refused.stderr and "Traceback" not in refused.stderr

    unreachable = run_plan(service, *common(models_dir), "--server", "http://127.0.0.1:9")
    assert unreachable.returncode == 1 and "cannot reach http://127.0.0.1:9" in unreachable.stderr
    assert unreachable.stderr.count("\n") == 1

    both = run_plan(service, *common(models_dir), "--budget-ppl", "5", "--budget-accuracy", "2")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr  # argparse's own line

    budget = run_plan(service, *common(models_dir), "--sparsities", "0.5", "--budget-ppl", "5", "--json")
    assert budget.returncode == 0, budget.stderr
    body = json.loads(budget.stdout.split("\n", 1)[1])
    assert body["mode"] == "budget" and body["budget"] == {"metric": "perplexity", "max_increase_pct": 5.0}
    service.client.post(f"/api/v1/plans/{body['id']}/cancel")  # its one job need not run
