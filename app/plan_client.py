"""``sparsegpt plan MODEL --sparsities 0,0.5,2:4 --quantize none,W4A16 ...``: submit a compression
plan to a server and print its page's URL and id. ``--wait`` follows it to the end and prints its
table (the recommended row marked ``*``); ``--csv FILE`` writes the table as CSV, ``--json`` prints
the plan's JSON instead of the table. ``--budget-ppl PCT`` / ``--budget-accuracy POINTS`` make it a
budget search (the smallest setting within the budget) instead of a grid.

The server is ``--server`` or ``SPARSEGPT_URL`` (default http://127.0.0.1:8000); the token is
``SPARSEGPT_TOKEN`` (as ``sparsegpt pull``). A MODEL, calibration or evaluation file that exists
here is sent as its absolute path (the server must be allowed to read it); anything else as given
(a Hub id, a built-in set). No torch here: the command answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PROG = "sparsegpt plan"
DEFAULT_SERVER = "http://127.0.0.1:8000"
FINISHED = ("succeeded", "failed", "cancelled")
POLL_S = 2.0


class PlanError(Exception):
    """One line for the user; the command exits 1."""


def add_parser(sub) -> None:
    # Long on purpose: one declaration per flag.
    p = sub.add_parser(
        "plan",
        help="try several sparsities / quantization schemes on one model and chart quality against size",
        description="Submit a compression plan: every combination of the settings is a job (a grid), or, with a "
        "budget, the settings are tried in order of size until one misses it.",
    )
    p.add_argument("model", metavar="MODEL", help="a Hub id, or a model directory the server may read")
    p.add_argument("--sparsities", default="0,0.5,2:4", help="comma-separated: ratios, N:M, 0 (default 0,0.5,2:4)")
    p.add_argument("--methods", default="sparsegpt", help="comma-separated pruning methods (default sparsegpt)")
    p.add_argument(
        "--quantize", default="none", help="comma-separated schemes: none, W8A16, W4A16, FP8_DYNAMIC (default none)"
    )
    p.add_argument("--refit", choices=("off", "on", "both"), default="off", help="refit after the prune (default off)")
    p.add_argument("--group-size", type=int, default=None, help="W4A16/W8A16 input columns per scale (default 128)")
    p.add_argument("--actorder", action="store_true", help="quantize the columns in act order (sparsegpt)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-ppl", type=float, metavar="PCT", help="a budget: perplexity at most +PCT%% of the dense model's"
    )
    budget.add_argument(
        "--budget-accuracy",
        type=float,
        metavar="POINTS",
        help="a budget: mean zero-shot accuracy at most POINTS below the dense model's (needs --eval-tasks)",
    )
    p.add_argument("--calibration", default=None, help="calibration set: c4, wikitext2, ptb, upload:<id> or a file")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window")
    p.add_argument("--seed", type=int, default=None, help="the windows' sampling seed")
    p.add_argument("--eval", default=None, metavar="SET[,SET...]", help="perplexity sets (default wikitext2)")
    p.add_argument("--eval-windows", type=int, default=None, help="at most this many evaluation windows per set")
    p.add_argument("--eval-tasks", default=None, metavar="TASK[,TASK...]", help="zero-shot tasks (lm-eval)")
    p.add_argument("--dtype", default=None, choices=("auto", "float16", "bfloat16", "float32"), help="weights' dtype")
    p.add_argument("--priority", choices=("normal", "low"), default="normal", help="low: after every ordinary job")
    p.add_argument("--name", default=None, help="a name for the plan's page")
    p.add_argument(
        "--server",
        default=None,
        help=f"the service's URL (default $SPARSEGPT_URL or {DEFAULT_SERVER}); the token is $SPARSEGPT_TOKEN",
    )
    p.add_argument("--wait", action="store_true", help="follow the plan until it ends, then print its table")
    p.add_argument("--csv", metavar="FILE", default=None, help="write the plan's table as CSV to FILE")
    p.add_argument("--json", action="store_true", help="print the plan's JSON instead of the table")
    p.set_defaults(func=main)


def _items(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _local(value: str) -> str:
    """A path that exists here, absolute; anything else as given."""
    path = Path(value).expanduser()
    return str(path.resolve()) if value and path.exists() else value


def body_of(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /api/v1/plans body the flags make."""
    candidates: dict[str, Any] = {
        "sparsities": _items(args.sparsities),
        "methods": _items(args.methods),
        "quantization": [None if q.lower() == "none" else q for q in _items(args.quantize)],
        "refit": {"off": [False], "on": [True], "both": [False, True]}[args.refit],
    }
    body: dict[str, Any] = {"model": _local(args.model), "priority": args.priority, "actorder": args.actorder}
    if args.budget_ppl is not None:
        body["budget"] = {**candidates, "metric": "perplexity", "max_increase_pct": args.budget_ppl}
    elif args.budget_accuracy is not None:
        body["budget"] = {**candidates, "metric": "accuracy", "max_drop_points": args.budget_accuracy}
    else:
        body["grid"] = candidates
    calibration = {"dataset": _local(args.calibration) if args.calibration else None}
    calibration.update(nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    body["calibration"] = {k: v for k, v in calibration.items() if v is not None}
    evaluation: dict[str, Any] = {"max_windows": args.eval_windows}
    if args.eval is not None:
        evaluation["datasets"] = [_local(d) for d in _items(args.eval) if d.lower() != "none"]
    if args.eval_tasks is not None:
        evaluation["tasks"] = _items(args.eval_tasks)
    body["evaluation"] = {k: v for k, v in evaluation.items() if v is not None}
    for key, value in (("group_size", args.group_size), ("dtype", args.dtype), ("name", args.name)):
        if value is not None:
            body[key] = value
    return body


def main(args: argparse.Namespace) -> int:
    server = (args.server or os.environ.get("SPARSEGPT_URL") or DEFAULT_SERVER).rstrip("/")
    token = os.environ.get("SPARSEGPT_TOKEN") or None
    plan: dict[str, Any] = {}
    try:
        import httpx  # here, so that building the CLI's parser loads nothing

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(base_url=server, headers=headers, timeout=httpx.Timeout(60, connect=10)) as client:
            plan = _submit(client, server, body_of(args))
            jobs = sum(1 for p in plan["points"] if p["state"] != "dense")
            print(f"plan {plan['id']}: {server}{plan['url']} ({jobs} job(s), {plan['status']})", flush=True)
            if args.wait:
                plan = _follow(client, server, plan)
            if args.csv:
                _write_csv(client, server, plan["id"], Path(args.csv).expanduser())
    except PlanError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        where = f": {server}{plan['url']}" if plan else ""
        print(f"{PROG}: interrupted; the plan goes on on the server{where}", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(plan, indent=2))
    elif args.wait:
        print(table(plan))
    return 0 if plan.get("status") != "failed" else 1


def _request(client, server: str, method: str, path: str, **kwargs):
    import httpx

    try:
        return client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise PlanError(
            f"cannot reach {server} ({type(exc).__name__}: {exc}); is the service running? "
            "(--server URL or SPARSEGPT_URL)"
        ) from None


def _detail(response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, list):
        return "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    return detail if isinstance(detail, str) else f"{response.status_code} {response.reason_phrase}"


def _submit(client, server: str, body: dict[str, Any]) -> dict[str, Any]:
    response = _request(client, server, "POST", "/api/v1/plans", json=body)
    if response.status_code == 401:
        raise PlanError(f"the server wants a token: set SPARSEGPT_TOKEN ({_detail(response)})")
    if response.status_code not in (200, 201):
        raise PlanError(f"the server refused the plan: {_detail(response)}")
    return response.json()


def _get(client, server: str, plan_id: int) -> dict[str, Any]:
    response = _request(client, server, "GET", f"/api/v1/plans/{plan_id}")
    if response.status_code != 200:
        raise PlanError(f"plan {plan_id}: {_detail(response)}")
    return response.json()


def _follow(client, server: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Poll until the plan ends; one line on stderr whenever its counts change."""
    shown = None
    while True:
        counts = {k: v for k, v in plan["counts"].items() if v}
        line = ", ".join(f"{v} {k}" for k, v in counts.items())
        if line != shown:
            print(f"plan {plan['id']}: {plan['status']} ({line or 'nothing yet'})", file=sys.stderr, flush=True)
            shown = line
        if plan["status"] in FINISHED and not plan["counts"].get("queued") and not plan["counts"].get("running"):
            return plan
        time.sleep(POLL_S)
        plan = _get(client, server, plan["id"])


def _write_csv(client, server: str, plan_id: int, target: Path) -> None:
    response = _request(client, server, "GET", f"/api/v1/plans/{plan_id}/table.csv")
    if response.status_code != 200:
        raise PlanError(f"plan {plan_id}'s table: {_detail(response)}")
    try:
        target.write_bytes(response.content)
    except OSError as exc:
        raise PlanError(f"cannot write {target}: {exc.strerror or exc}") from None
    print(f"table written to {target}", file=sys.stderr)


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(plan: dict[str, Any]) -> str:
    """The plan's table in columns, the recommended row marked ``*`` and the reason below."""
    ppl = plan["metric"] == "perplexity"
    head = ["", "setting", "status", "perplexity" if ppl else "accuracy", "change", "MB", "ratio", "budget", "pareto"]
    rows = [head]
    for p in plan["points"]:
        setting = "dense model" if p["state"] == "dense" else f"{p['method']} {p['sparsity']} {p['quantization'] or ''}"
        setting += " refit" if p["refit"] else ""
        quality = _fmt(p["perplexity"], ".3f") if ppl else _fmt(p["mean_accuracy"], ".4f")
        change = _fmt(p["quality_change_pct"], "+.1f", "%") if ppl else _fmt(p["accuracy_drop_points"], "+.2f", " pt")
        status = p["status"] + (f" #{p['job_id']}" if p["job_id"] else "")
        budget = {True: "yes", False: "no", None: "-"}[p["meets_budget"]]
        size = _fmt(p["bytes"] / 1e6 if p["bytes"] is not None else None, ".2f")
        mark = "*" if p["recommended"] else ""
        rows.append([mark, setting.strip(), status, quality, change, size, _fmt(p["ratio"], ".3f"), budget])
        rows[-1].append("yes" if p["pareto"] else "")
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    rec = plan.get("recommended")
    why = plan["recommendation_reason"]
    if rec:
        lines.append(f"recommended: {rec['key']} (job {rec['job_id']}; sparsegpt pull {rec['job_id']}): {why}")
    else:
        lines.append(f"nothing recommended: no finished job fits ({why})")
    return "\n".join(lines)
