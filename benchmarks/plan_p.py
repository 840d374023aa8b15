"""A compression plan on protocol P, through the real service: the README's chart, and its figures
held against the same settings run as separate jobs.

    SPARSEGPT_DATA_DIR=build/plan-p sparsegpt serve --port 8765 \\
        --allow-dir "$PWD/models" --allow-dir "$PWD/../shared/data/protocol-p" &
    python benchmarks/plan_p.py --server http://127.0.0.1:8765            # submit, wait, chart, table
    python benchmarks/plan_p.py --server http://127.0.0.1:8765 --plan 1   # an existing plan

The plan is SmolLM2-135M (fp32) x sparsity 0 / 0.5 / 2:4 x quantization none / W8A16 / W4A16 (group
size 64), protocol P's 32 x 512 calibration windows (seed 0) and 40 x 512 evaluation windows: 8 jobs
and the dense model, evaluated once. When it has ended, the plan's page is photographed in headless
Chromium (``--screenshot``, default docs/img/plan-p.png) and its table printed; each point whose
setting was also run as a separate process by benchmarks/quant_p.py (build/quant-p/<key>.json: the
saved checkpoint loaded back and evaluated on the same windows) is compared with it, and so is the
dense perplexity. Results in benchmarks/results/plan_p.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import reference_sparsegpt as ref  # noqa: E402

RESULT = HERE / "results" / "plan_p.json"
SCREENSHOT = REPO / "docs" / "img" / "plan-p.png"
QUANT_P = REPO / "build" / "quant-p"
# The plan's point -> benchmarks/quant_p.py's run of the same setting as its own process.
SEPARATE = {
    "dense": "dense",
    "sparsegpt-0-W4A16": "ours-w4a16",
    "sparsegpt-0.5-W4A16": "ours-s50-w4a16",
    "sparsegpt-2:4-W4A16": "ours-s24-w4a16",
}
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")


def submit(server: str) -> int:
    cmd = [
        str(REPO / ".venv" / "bin" / "sparsegpt"),
        "plan",
        str(ref.DEFAULT_MODEL),
        "--sparsities",
        "0,0.5,2:4",
        "--quantize",
        "none,W8A16,W4A16",
        "--group-size",
        "64",
        "--calibration",
        str(ref.DATA / "calibration.txt"),
        "--nsamples",
        "32",
        "--seqlen",
        "512",
        "--seed",
        "0",
        "--eval",
        str(ref.DATA / "eval.txt"),
        "--eval-windows",
        "40",
        "--dtype",
        "float32",
        "--name",
        "SmolLM2-135M, protocol P",
        "--server",
        server,
        "--json",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out)["id"])


def wait(server: str, plan_id: int, poll_s: float = 20.0) -> dict:
    import httpx

    while True:
        plan = httpx.get(f"{server}/api/v1/plans/{plan_id}", timeout=30).raise_for_status().json()
        if plan["status"] in ("succeeded", "failed", "cancelled"):
            return plan
        print(f"{time.strftime('%H:%M:%S')} plan {plan_id}: {plan['counts']}", flush=True)
        time.sleep(poll_s)


def screenshot(server: str, plan_id: int, path: Path) -> None:
    from playwright.sync_api import sync_playwright

    path.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.goto(f"{server}/plans/{plan_id}")
        page.wait_for_function("() => document.querySelector('canvas') && window.Chart")
        page.wait_for_timeout(800)  # the chart's animation
        page.screenshot(path=str(path), full_page=True)
        browser.close()


def compare(plan: dict) -> list[dict]:
    """Each point beside its separate run (where quant_p.py made one): perplexities and their ratio."""
    rows = []
    for point in plan["points"]:
        key = SEPARATE.get(point["key"])
        run = QUANT_P / f"{key}.json" if key else None
        separate = json.loads(run.read_text()).get("perplexity") if run and run.exists() else None
        ratio = point["perplexity"] / separate if separate and point["perplexity"] else None
        rows.append({"point": point["key"], "plan": point["perplexity"], "separate": separate, "ratio": ratio})
    return rows


def table(plan: dict, rows: list[dict]) -> str:
    sep = {r["point"]: r for r in rows}
    lines = [
        "| setting | job | perplexity | vs dense | download | x dense | Pareto | separate run | plan / separate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in plan["points"]:
        r = sep.get(p["key"], {})
        ppl = "-" if p["perplexity"] is None else f"{p['perplexity']:.3f}"
        change = "-" if p["quality_change_pct"] is None else f"{p['quality_change_pct']:+.1f}%"
        size = "-" if p["bytes"] is None else f"{p['bytes'] / 1e6:.1f} MB"
        ratio = "-" if p["ratio"] is None else f"{p['ratio']:.3f}"
        other = "-" if r.get("separate") is None else f"{r['separate']:.3f}"
        same = "-" if r.get("ratio") is None else f"{r['ratio']:.6f}"
        mark = " (recommended)" if p["recommended"] else ""
        lines.append(
            f"| {p['key']}{mark} | {p['job_id'] or '-'} | {ppl} | {change} | {size} | {ratio} | "
            f"{'yes' if p['pareto'] else '-'} | {other} | {same} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A protocol P compression plan through the service; chart and table")
    p.add_argument("--server", default="http://127.0.0.1:8765")
    p.add_argument("--plan", type=int, help="an existing plan's id (default: submit one)")
    p.add_argument("--screenshot", default=str(SCREENSHOT))
    p.add_argument("--json", default=str(RESULT))
    a = p.parse_args(argv)
    plan_id = a.plan or submit(a.server)
    plan = wait(a.server, plan_id)
    screenshot(a.server, plan_id, Path(a.screenshot))
    rows = compare(plan)
    Path(a.json).write_text(json.dumps({"plan": plan, "separate_runs": rows}, indent=2) + "\n")
    print(table(plan, rows))
    print(f"\nrecommended: {plan['recommendation_reason']}; screenshot {a.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
