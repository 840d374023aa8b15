"""Protocol P quality table (issue 12): method x pattern, every figure from one run of this script.

Rows (the engine, SparseGPT, ../shared/BENCHMARK.md's protocol P: 32 x 512 calibration tokens,
40 x 512 evaluation windows, fp32, 2 threads):
  sparsegpt    plain SparseGPT, uniform sparsity
  owl          SparseGPT with OWL's per-block profile (unstructured patterns only)
  refit        SparseGPT, then the refit (``--refit``, worker/engine/refit.py)
  owl+refit    both
at 50%, 2:4, 4:8, 60% and 70%: perplexity, prune seconds (OWL's dense pass and the refit included),
the refit's own seconds and the layers' mean relative reconstruction error before/after it, and the
ratios to the plain SparseGPT run of the same pattern in this run. Then the issue's targets.

    nice .venv/bin/python benchmarks/quality.py --json benchmarks/results/quality_p.json   # ~1 h idle
    .venv/bin/python benchmarks/quality.py --from-json benchmarks/results/quality_p.json   # tables again
    .venv/bin/python benchmarks/quality.py --patterns 0.5 --variants sparsegpt,refit        # a part

Each configuration runs in its own process (``--one VARIANT PATTERN``); the JSON is rewritten after
every run, so a stopped table keeps its figures (``"partial": true``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository is where benchmarks/ is a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.protocol_p import REPO, add_protocol_args  # noqa: E402

VARIANTS = ("sparsegpt", "owl", "owl+refit", "refit")  # run in this order within a pattern
PATTERNS = ("0.7", "0.5", "2:4", "0.6", "4:8")  # the targets' patterns first: a stopped run has them
REFERENCE = {"dense": 28.404, "0.5": 50.641, "2:4": 83.441, "4:8": 64.210}  # ../shared/BENCHMARK.md
GAP_SHARE = 0.10  # 50% and 2:4: close at least this share of the SparseGPT-to-dense gap
OWL_70_RATIO = 0.75  # 70%: OWL (+ refit) at most this times plain SparseGPT


def one_run(variant: str, pattern: str, args) -> dict:
    """One configuration through worker.engine.pipeline.run_job, in this process."""
    import torch

    sys.path.insert(0, str(REPO))
    from worker.engine.contract.spec import JobSpec
    from worker.engine.pipeline import RunOptions, run_job

    torch.set_num_threads(args.threads)
    eval_key = str(args.eval_file)
    fields = dict(
        model=str(args.model),
        sparsity=pattern,
        method="sparsegpt",
        dataset=str(args.calibration),
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        blocksize=128,
        percdamp=0.01,
        datasets=[eval_key],
        max_windows=args.eval_windows,
        dense=args.dense,
        dtype="float32",
        sparsity_profile="owl" if variant.startswith("owl") else "uniform",
        refit=args.refit if variant.endswith("refit") else "none",
    )
    if args.tasks:
        fields.update(tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], task_limit=args.task_limit)
    spec = JobSpec.from_flat(**fields)
    t0 = time.perf_counter()
    report = run_job(spec, RunOptions(device="cpu", **({"task_dirs": (str(args.task_dir),)} if args.task_dir else {})))
    seconds = report["seconds"]
    return {
        "variant": variant,
        "pattern": pattern,
        "refit_mode": spec.solver.refit,
        "perplexity": report["perplexity"][eval_key],
        "dense_perplexity": report.get("dense_perplexity", {}).get(eval_key),
        "prune_seconds": seconds.get("prune", 0.0) + seconds.get("profile", 0.0),
        "refit_seconds": seconds.get("refit"),
        "profile_seconds": seconds.get("profile"),
        "seconds": seconds,
        "wall_seconds": time.perf_counter() - t0,
        "sparsity": report["sparsity"],
        "refit": report.get("refit"),
        "profile": report.get("profile"),
        "zeroshot": _zeroshot(report),
        "layer_errors": [r["error"] for r in report["layers"]],
    }


def _zeroshot(report: dict) -> dict | None:
    """The pruned model's zero-shot metrics per task (the report's zero_shot, issue 12 item 3), and the
    dense model's under "dense:<task>" where it was measured."""
    found = report.get("zero_shot") or {}
    if not found.get("pruned"):
        return None
    return {**found["pruned"], **{f"dense:{t}": v for t, v in (found.get("dense") or {}).items()}}


def run_child(variant: str, pattern: str, args, dense: bool) -> dict:
    tag = f"{variant}-{pattern.replace(':', 'of')}".replace("+", "_")
    out, log = args.workdir / f"{tag}.json", args.workdir / f"{tag}.log"
    out.unlink(missing_ok=True)
    cmd = (
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--one",
            variant,
            pattern,
            "--json",
            str(out),
            "--refit",
            args.refit,
            "--threads",
            str(args.threads),
            "--model",
            str(args.model),
            "--calibration",
            str(args.calibration),
            "--eval",
            str(args.eval_file),
            "--eval-windows",
            str(args.eval_windows),
            "--nsamples",
            str(args.nsamples),
            "--seqlen",
            str(args.seqlen),
            "--seed",
            str(args.seed),
        ]
        + (["--dense"] if dense else [])
        + (["--tasks", args.tasks] if args.tasks else [])
        + (["--task-dir", str(args.task_dir)] if args.task_dir else [])
        + (["--task-limit", str(args.task_limit)] if args.task_limit else [])
    )
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
    )
    print(f"  {variant:<10}{pattern:>5}", end=" ", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
    if code != 0 or not out.exists():
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        print(f"FAILED, see {log}")
        return {"variant": variant, "pattern": pattern, "error": f"exit code {code}: {tail}"}
    result = json.loads(out.read_text())
    print(
        f"ppl {result['perplexity']:8.3f}  prune {result['prune_seconds']:6.1f}s  ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    return result


def _reuse(variant: str, pattern: str, args) -> dict | None:
    """A finished run's figures already in the workdir (a table resumed after a stop), else None."""
    path = args.workdir / (f"{variant}-{pattern.replace(':', 'of')}".replace("+", "_") + ".json")
    if not path.exists():
        return None
    print(f"  {variant:<10}{pattern:>5} reused {path}", flush=True)
    return json.loads(path.read_text())


def _ratio(a, b):
    return None if a is None or not b else a / b


def _f(x, spec: str, width: int) -> str:
    return f"{x:{width}{spec}}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def add_ratios(runs: list[dict]) -> None:
    plain = {r["pattern"]: r for r in runs if r["variant"] == "sparsegpt" and "error" not in r}
    for r in runs:
        base = plain.get(r["pattern"])
        if "error" in r or base is None:
            continue
        r["ppl_vs_plain"] = _ratio(r["perplexity"], base["perplexity"])
        r["prune_s_vs_plain"] = _ratio(r["prune_seconds"], base["prune_seconds"])
        r["extra_prune_seconds"] = r["prune_seconds"] - base["prune_seconds"]


def dense_of(runs: list[dict]) -> float | None:
    return next((r["dense_perplexity"] for r in runs if r.get("dense_perplexity")), None)


def print_table(runs: list[dict]) -> None:
    dense = dense_of(runs)
    print(f"\nProtocol P quality (SmolLM2-135M, eval.txt 40 x 512): dense perplexity {_f(dense, '.3f', 0)} (this run)")
    tasks = sorted({k for r in runs for k in (r.get("zeroshot") or {})})
    head = (
        f"{'variant':<11}{'pattern':>7}{'ppl':>9}{'ppl/plain':>10}{'prune s':>9}{'s/plain':>8}"
        f"{'refit s':>8}{'err before':>11}{'err after':>10}" + "".join(f"{t[:12]:>13}" for t in tasks)
    )
    print(head)
    print("-" * len(head))
    for pattern in PATTERNS:
        rows = [r for r in runs if r["pattern"] == pattern]
        for r in sorted(rows, key=lambda r: VARIANTS.index(r["variant"])):
            if "error" in r:
                print(f"{r['variant']:<11}{pattern:>7}  FAILED: {r['error'][:80]}")
                continue
            fit = r.get("refit") or {}
            acc = r.get("zeroshot") or {}
            print(
                f"{r['variant']:<11}{pattern:>7}{_f(r['perplexity'], '.3f', 9)}{_f(r.get('ppl_vs_plain'), '.4f', 10)}"
                f"{_f(r['prune_seconds'], '.1f', 9)}{_f(r.get('prune_s_vs_plain'), '.2f', 8)}"
                f"{_f(r.get('refit_seconds'), '.1f', 8)}{_f(fit.get('error_before'), '.4f', 11)}"
                f"{_f(fit.get('error_after'), '.4f', 10)}"
                + "".join(_f(_accuracy(acc.get(t)), ".4f", 13) for t in tasks)
            )
        if rows:
            print()


def print_markdown(runs: list[dict]) -> None:
    print(
        "\n| method | pattern | perplexity | ppl / plain | prune s | prune s / plain | refit s | "
        "layer error before -> after refit |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for pattern in PATTERNS:
        for r in sorted(
            (r for r in runs if r["pattern"] == pattern and "error" not in r),
            key=lambda r: VARIANTS.index(r["variant"]),
        ):
            fit = r.get("refit") or {}
            err = f"{fit['error_before']:.4f} -> {fit['error_after']:.4f}" if fit.get("layers") else ""
            print(
                f"| {r['variant']} | {pattern} | {r['perplexity']:.3f} | {_f(r.get('ppl_vs_plain'), '.4f', 0)} | "
                f"{r['prune_seconds']:.1f} | {_f(r.get('prune_s_vs_plain'), '.2f', 0)} | "
                f"{_f(r.get('refit_seconds'), '.1f', 0)} | {err} |"
            )


def _accuracy(value):
    if isinstance(value, dict):
        for key in ("acc", "acc,none", "accuracy", "pruned"):
            if isinstance(value.get(key), (int, float)):
                return value[key]
        return None
    return value


def check_targets(runs: list[dict]) -> list[dict]:
    """The issue's targets, against this run's plain SparseGPT (and, for 50% / 2:4, also the reference's
    figures of BENCHMARK.md)."""
    ok_runs = [r for r in runs if "error" not in r]
    dense = dense_of(ok_runs)
    plain = {r["pattern"]: r["perplexity"] for r in ok_runs if r["variant"] == "sparsegpt"}
    checks = []

    def best(pattern, variants):
        cands = [r for r in ok_runs if r["pattern"] == pattern and r["variant"] in variants]
        return min(cands, key=lambda r: r["perplexity"]) if cands else None

    b = best("0.7", ("owl", "owl+refit"))
    if b and "0.7" in plain:
        checks.append(
            {
                "target": f"70%: OWL(+refit) <= {OWL_70_RATIO}x plain",
                "variant": b["variant"],
                "value": b["perplexity"],
                "limit": OWL_70_RATIO * plain["0.7"],
            }
        )
    for pattern in ("0.5", "2:4"):
        b = best(pattern, ("owl", "refit", "owl+refit"))
        if b is None or pattern not in plain:
            continue
        if dense is not None:
            checks.append(
                {
                    "target": f"{pattern}: close {GAP_SHARE:.0%} of this run's gap ({plain[pattern]:.2f} -> "
                    f"{dense:.2f})",
                    "variant": b["variant"],
                    "value": b["perplexity"],
                    "limit": plain[pattern] - GAP_SHARE * (plain[pattern] - dense),
                }
            )
        ref = REFERENCE[pattern]
        checks.append(
            {
                "target": f"{pattern}: <= reference figure {ref} - {GAP_SHARE:.0%} of its gap",
                "variant": b["variant"],
                "value": b["perplexity"],
                "limit": round(ref - GAP_SHARE * (ref - REFERENCE["dense"]), 1),
            }
        )
    if checks:
        print("Targets (issue 12):")
    for c in checks:
        c["ok"] = c["value"] <= c["limit"]
        c["missed_by"] = None if c["ok"] else c["value"] - c["limit"]
        verdict = "PASS" if c["ok"] else f"MISS by {c['missed_by']:.2f}"
        print(f"  {verdict:<14} {c['target']:<60} best {c['variant']:<10} {c['value']:8.3f} (limit {c['limit']:.3f})")
    return checks


def write_json(path: Path | None, runs, checks, args, partial: bool, wall: float) -> None:
    if path is None:
        return
    import torch

    payload = {
        "protocol": "P",
        "table": "quality",
        "partial": partial,
        "refit": args.refit,
        "config": {k: str(v) for k, v in vars(args).items()},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_end": os.getloadavg(),
        },
        "runs": runs,
        "targets": checks,
        "wall_seconds": wall,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--refit", default="swap+reconstruct", help="the refit mode of the refit rows")
    p.add_argument("--tasks", default="", help="zero-shot tasks (evaluation.tasks), e.g. wikitext_cloze")
    p.add_argument(
        "--task-dir",
        type=Path,
        help="a directory of local lm-eval task YAMLs "
        "(python -m benchmarks.zeroshot_task DIR writes protocol P's wikitext_cloze)",
    )
    p.add_argument("--task-limit", type=int, help="at most this many examples per task")
    add_protocol_args(p)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dense", action="store_true", help="(--one) also evaluate the dense model")
    p.add_argument(
        "--configs",
        default="",
        help="an explicit list and order: VARIANT@PATTERN,... (the first also evaluates the dense model)",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each with --threads threads)")
    p.add_argument("--reuse", action="store_true", help="take a run's figures from the workdir where present")
    p.add_argument(
        "--collect", action="store_true", help="only gather the workdir's finished runs into the table (runs nothing)"
    )
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for the README)")
    p.add_argument("--workdir", type=Path, default=REPO / "build" / "quality-p")
    p.add_argument("--json", type=Path)
    p.add_argument("--from-json", type=Path)
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "PATTERN"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        result = one_run(args.one[0], args.one[1], args)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        print_table(data["runs"])
        check_targets(data["runs"])
        return 0
    variants = [v for v in args.variants.split(",") if v]
    patterns = [p for p in args.patterns.split(",") if p]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    configs = [
        (v, p) for p in patterns for v in variants if not (v.startswith("owl") and ":" in p)
    ]  # OWL: unstructured
    if args.configs:  # an explicit order, VARIANT@PATTERN,...
        configs = [tuple(c.split("@", 1)) for c in args.configs.split(",") if c]
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"protocol P quality: {len(configs)} runs, {args.jobs} at a time, refit {args.refit}; logs in {args.workdir}")
    t0, runs, lock = time.perf_counter(), [], threading.Lock()

    def one(k: int) -> None:
        variant, pattern = configs[k]
        reused = _reuse(variant, pattern, args) if args.reuse or args.collect else None
        if reused is None and args.collect:
            print(f"  {variant:<10}{pattern:>5} not measured (no {args.workdir} figures)", flush=True)
            return
        result = reused or run_child(variant, pattern, args, dense=k == 0)  # (a reused first run keeps its own)
        with lock:
            runs.append(result)
            add_ratios(runs)
            write_json(args.json, runs, [], args, True, time.perf_counter() - t0)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, range(len(configs))))
    add_ratios(runs)
    print_table(runs)
    if args.markdown:
        print_markdown(runs)
    checks = check_targets(runs)
    write_json(args.json, runs, checks, args, False, time.perf_counter() - t0)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
