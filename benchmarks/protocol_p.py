"""Benchmark protocol P (../shared/BENCHMARK.md): our engine beside the reference and llm-compressor.

Every run (one runner, method and pattern) is its own subprocess, so each has its own peak
RSS; the dense model is evaluated once and shared. Runners:
  engine          this project's worker.engine.pipeline.run_job          (benchmarks/engine_p.py)
  reference       the reference SparseGPT procedure, plainly             (benchmarks/reference_sparsegpt.py)
  llmcompressor   llm-compressor 0.14, in its own venv .venv-bench       (benchmarks/llmcompressor_p.py)

    python benchmarks/prepare_model.py                 # once: models/smollm2-135m
    nice python benchmarks/protocol_p.py               # SparseGPT 50%, all runners (~10-15 min)
    nice python benchmarks/protocol_p.py --patterns 0.5,2:4,4:8 --json bench.json
    nice python benchmarks/protocol_p.py --full        # + the other methods, every pattern
    python benchmarks/protocol_p.py --from-json bench.json   # print the tables again

Prints, per method and pattern: perplexity, prune seconds and peak RSS after the prune, with
ratios to the reference run of this same run, to llm-compressor's run of this same run, and to
the fixed figures of BENCHMARK.md; then the targets of issues 2 and 6 for the engine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
from worker.engine.contract.method_table import METHOD_NAMES  # noqa: E402  (torch-free: the engine's methods)

DATA = REPO.parent / "shared" / "data" / "protocol-p"
DEFAULT_MODEL = REPO / "models" / "smollm2-135m"
BENCH_VENV_PYTHON = REPO / ".venv-bench" / "bin" / "python"
GB = 1e9

RUNNERS = ("engine", "engine-exact", "reference", "llmcompressor")
SCRIPTS = {
    "engine": "engine_p.py",
    "engine-exact": "engine_p.py",
    "reference": "reference_sparsegpt.py",
    "llmcompressor": "llmcompressor_p.py",
}
METHODS = {
    "engine": METHOD_NAMES,
    "engine-exact": ("sparsegpt",),  # the engine with exact=True: the reference's arithmetic
    "reference": ("sparsegpt", "wanda", "magnitude"),
    "llmcompressor": ("sparsegpt", "wanda"),
}

# ../shared/BENCHMARK.md, measured on this machine's kind: (perplexity, prune s, peak RSS GB)
FIXED = {
    ("dense", "-"): (28.404, None, 0.61),
    ("magnitude", "0.5"): (484.95, 8.7, 0.89),
    ("magnitude", "2:4"): (1457.69, 1.8, 0.87),
    ("wanda", "0.5"): (60.15, 68.9, 1.31),  # llm-compressor 0.14's Wanda
    ("wanda", "2:4"): (176.42, 75.1, 1.25),
    ("sparsegpt", "0.5"): (50.641, 117.7, 1.47),  # the reference code (IST-DASLab)
    ("sparsegpt", "2:4"): (83.441, 117.4, 1.48),
    ("sparsegpt", "4:8"): (64.210, 115.3, 1.48),
}
FIXED_LLMC = {
    ("sparsegpt", "0.5"): (51.07, 123.3, 1.28),
    ("sparsegpt", "2:4"): (83.17, 113.6, 1.25),
    ("sparsegpt", "4:8"): (64.18, 115.2, 1.26),
    ("wanda", "0.5"): (60.15, 68.9, 1.31),
    ("wanda", "2:4"): (176.42, 75.1, 1.25),
}


def norm_pattern(p: str) -> str:
    p = p.strip()
    return p if ":" in p else f"{float(p):g}"


def fixed_for(run: dict) -> tuple | None:
    key = (run["method"], run["pattern"])
    if run["runner"] == "llmcompressor":
        return FIXED_LLMC.get(key)
    return FIXED.get(key)


# ----------------------------------------------------------------------------- runner discovery


def llmcompressor_python() -> str | None:
    if importlib.util.find_spec("llmcompressor") is not None:
        return sys.executable
    if BENCH_VENV_PYTHON.exists():
        probe = subprocess.run([str(BENCH_VENV_PYTHON), "-c", "import llmcompressor"], capture_output=True)
        if probe.returncode == 0:
            return str(BENCH_VENV_PYTHON)
    return None


def engine_available() -> bool:
    sys.path.insert(0, str(REPO))
    try:
        return importlib.util.find_spec("worker.engine.pipeline") is not None
    except ImportError:
        return False
    finally:
        sys.path.remove(str(REPO))


# ----------------------------------------------------------------------------- one child run


def run_child(runner: str, method: str, pattern: str | None, args, python: str, extra: list[str] = ()) -> dict:
    """Run one configuration in its own process; its figures plus the process's own peak RSS."""
    tag = f"{runner}-{method}-{(pattern or 'dense').replace(':', 'of')}"
    out_json = args.workdir / f"{tag}.json"
    log = args.workdir / f"{tag}.log"
    out_json.unlink(missing_ok=True)
    cmd = [
        python,
        str(BENCH / SCRIPTS[runner]),
        "--method",
        method,
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
        "--blocksize",
        str(args.blocksize),
        "--percdamp",
        str(args.percdamp),
        "--threads",
        str(args.threads),
        "--json",
        str(out_json),
        *extra,
    ]
    if pattern is not None:
        cmd += ["--sparsity", pattern]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    print(f"  {tag:<34}", end="", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            preexec_fn=(lambda: os.nice(args.nice)) if args.nice else None,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    result = {
        "runner": runner,
        "method": method,
        "pattern": pattern or "-",
        "wall_seconds": wall,
        "process_peak_rss": usage.ru_maxrss * 1024,
        "log": str(log),
    }
    if proc.returncode != 0 or not out_json.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        result["error"] = f"exit code {proc.returncode}: " + " | ".join(tail)
        print(f"FAILED ({wall:.0f}s) see {log}")
        return result
    figures = json.loads(out_json.read_text())
    figures.pop("pattern", None)
    result.update({k: v for k, v in figures.items() if k not in ("runner", "method")})
    ppl = result.get("perplexity")
    ps = result.get("prune_seconds")
    print(f"ppl {ppl:9.3f}" if ppl is not None else "ppl        -", end="")
    print(f"  prune {ps:7.1f}s" if ps is not None else "  prune       -", end="")
    print(f"  ({wall:.0f}s)")
    return result


# ----------------------------------------------------------------------------- tables


def _ratio(a, b) -> float | None:
    if a is None or b in (None, 0):
        return None
    return a / b


def _fmt(x, spec: str, width: int) -> str:
    return f"{x:{width}{spec}}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def add_ratios(runs: list[dict]) -> None:
    by_key = {(r["runner"], r["method"], r["pattern"]): r for r in runs if "error" not in r}
    for r in runs:
        if "error" in r:
            continue
        ref = by_key.get(("reference", r["method"], r["pattern"]))
        llmc = by_key.get(("llmcompressor", r["method"], r["pattern"]))
        fixed = fixed_for(r)
        rss = r.get("peak_rss_after_prune")
        r["ratios"] = {
            "ppl_vs_reference": _ratio(r.get("perplexity"), ref and ref.get("perplexity")),
            "prune_s_vs_reference": _ratio(r.get("prune_seconds"), ref and ref.get("prune_seconds")),
            "rss_vs_reference": _ratio(rss, ref and ref.get("peak_rss_after_prune")),
            "prune_s_vs_llmcompressor": _ratio(r.get("prune_seconds"), llmc and llmc.get("prune_seconds")),
            "ppl_vs_fixed": _ratio(r.get("perplexity"), fixed and fixed[0]),
            "prune_s_vs_fixed": _ratio(r.get("prune_seconds"), fixed and fixed[1]),
            "rss_vs_fixed": _ratio(rss and rss / GB, fixed and fixed[2]),
        }


def print_tables(runs: list[dict], windows: int | str = 40, seqlen: int | str = 512) -> None:
    head = (
        f"{'runner':<14}{'method':<10}{'pattern':>7}{'ppl':>10}{'prune s':>9}{'RSS GB':>8}"
        f" |{'ppl/ref':>8}{'s/ref':>7}{'rss/ref':>8}{'s/llmc':>7}"
        f" |{'ppl/fix':>8}{'s/fix':>7}{'rss/fix':>8}"
    )
    print(
        f"\nProtocol P: perplexity on eval.txt ({windows} x {seqlen}), prune seconds, "
        "peak RSS after prune (GB = 1e9 bytes)"
    )
    print("ratios: /ref = the reference procedure in this run, /llmc = llm-compressor in this run,")
    print("        /fix = the fixed figures of ../shared/BENCHMARK.md")
    print(head)
    print("-" * len(head))
    order = {m: i for i, m in enumerate(("dense", *METHOD_NAMES))}
    pat_order = {"-": 0, "0.5": 1, "2:4": 2, "4:8": 3}
    run_order = {n: i for i, n in enumerate(RUNNERS)}
    last = None
    for r in sorted(
        runs,
        key=lambda r: (
            order.get(r["method"], 9),
            pat_order.get(r["pattern"], 9),
            r["pattern"],
            run_order.get(r["runner"], 9),
        ),
    ):
        group = (r["method"], r["pattern"])
        if last is not None and group != last:
            print()
        last = group
        if "error" in r:
            print(f"{r['runner']:<14}{r['method']:<10}{r['pattern']:>7}  FAILED: {r['error'][:90]}")
            continue
        q = r.get("ratios", {})
        rss = r.get("peak_rss_after_prune")
        print(
            f"{r['runner']:<14}{r['method']:<10}{r['pattern']:>7}"
            f"{_fmt(r.get('perplexity'), '.3f', 10)}{_fmt(r.get('prune_seconds'), '.1f', 9)}"
            f"{_fmt(rss and rss / GB, '.2f', 8)} |"
            f"{_fmt(q.get('ppl_vs_reference'), '.4f', 8)}{_fmt(q.get('prune_s_vs_reference'), '.2f', 7)}"
            f"{_fmt(q.get('rss_vs_reference'), '.2f', 8)}{_fmt(q.get('prune_s_vs_llmcompressor'), '.2f', 7)} |"
            f"{_fmt(q.get('ppl_vs_fixed'), '.4f', 8)}{_fmt(q.get('prune_s_vs_fixed'), '.2f', 7)}"
            f"{_fmt(q.get('rss_vs_fixed'), '.2f', 8)}"
        )


def check_targets(runs: list[dict]) -> list[dict]:
    """Issue 2 / issue 6 targets for the engine's SparseGPT rows."""
    checks = []
    for r in runs:
        if r["runner"] not in ("engine", "engine-exact") or r["method"] != "sparsegpt" or "error" in r:
            continue
        q = r.get("ratios", {})
        for name, value, limit in (
            ("ppl within 1% of the reference (this run)", q.get("ppl_vs_reference"), 1.01),
            ("ppl within 1% of BENCHMARK.md's reference", q.get("ppl_vs_fixed"), 1.01),
            ("prune time <= 0.5x the reference (this run)", q.get("prune_s_vs_reference"), 0.5),
            ("prune time <= 0.5x llm-compressor (this run)", q.get("prune_s_vs_llmcompressor"), 0.5),
            ("peak RSS <= 0.8x the reference (this run)", q.get("rss_vs_reference"), 0.8),
        ):
            ok = None if value is None else value <= limit
            checks.append(
                {
                    "runner": r["runner"],
                    "pattern": r["pattern"],
                    "target": name,
                    "value": value,
                    "limit": limit,
                    "ok": ok,
                }
            )
    if checks:
        print("\nTargets (engine, SparseGPT):")
        for c in checks:
            verdict = {True: "PASS", False: "FAIL", None: "n/a "}[c["ok"]]
            print(
                f"  {verdict}  {c.get('runner', 'engine'):<13}{c['pattern']:>4}  {c['target']:<46} "
                f"{_fmt(c['value'], '.3f', 7)} (limit {c['limit']})"
            )
    return checks


# ----------------------------------------------------------------------------- main


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """Protocol P's model, data and sizes (../shared/BENCHMARK.md), the same in every benchmark of it."""
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--calibration", type=Path, default=DATA / "calibration.txt")
    p.add_argument("--eval", dest="eval_file", type=Path, default=DATA / "eval.txt")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", default="sparsegpt", help=f"comma list of {','.join(METHOD_NAMES)}")
    p.add_argument("--patterns", default="0.5", help="comma list, e.g. 0.5,2:4,4:8")
    p.add_argument(
        "--runners",
        default="engine,reference,llmcompressor",
        help="comma list of engine,engine-exact,reference,llmcompressor (missing ones "
        "are skipped; engine-exact is the engine reproducing the reference bit for bit)",
    )
    p.add_argument("--full", action="store_true", help=f"all methods ({', '.join(METHOD_NAMES)}) at 0.5, 2:4 and 4:8")
    p.add_argument("--no-dense", action="store_true", help="skip the dense evaluation")
    p.add_argument(
        "--engine-dense", action="store_true", help="also let the engine evaluate the dense model (in its first run)"
    )
    add_protocol_args(p)
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nice", type=int, default=0, help="niceness increment for the child runs")
    p.add_argument(
        "--workdir",
        type=Path,
        default=REPO / "build" / "bench-p",
        help="per-run logs and JSON (default build/bench-p, gitignored)",
    )
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--from-json", type=Path, help="print the tables of an earlier --json and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        cfg = data.get("config", {})
        print_tables(data["runs"], cfg.get("eval_windows", "?"), cfg.get("seqlen", "?"))
        check_targets(data["runs"])
        return 0

    methods = list(METHOD_NAMES) if args.full else [m.strip() for m in args.methods.split(",") if m.strip()]
    patterns = ["0.5", "2:4", "4:8"] if args.full else [norm_pattern(p) for p in args.patterns.split(",") if p.strip()]
    wanted = [r.strip() for r in args.runners.split(",") if r.strip()]
    for name in wanted:
        if name not in RUNNERS:
            raise SystemExit(f"unknown runner {name!r}; choose from {', '.join(RUNNERS)}")
    if not (args.model / "config.json").exists():
        raise SystemExit(f"no model at {args.model}: run `python benchmarks/prepare_model.py` first")

    pythons: dict[str, str] = {}
    notes = []
    if "reference" in wanted:
        pythons["reference"] = sys.executable
    for name in ("engine", "engine-exact"):
        if name not in wanted:
            continue
        if engine_available():
            pythons[name] = sys.executable
        else:
            notes.append(f"{name}: worker.engine.pipeline not importable, skipped")
    if "llmcompressor" in wanted:
        lc = llmcompressor_python()
        if lc:
            pythons["llmcompressor"] = lc
        else:
            notes.append("llmcompressor: not importable here nor in .venv-bench, skipped")
    for n in notes:
        print(n)

    args.workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    runs: list[dict] = []
    print(
        f"protocol P: methods {methods}, patterns {patterns}, runners {list(pythons)}, "
        f"{args.threads} threads; logs in {args.workdir}"
    )
    if not args.no_dense:
        runs.append(run_child("reference", "dense", None, args, sys.executable))
    engine_dense_pending = args.engine_dense
    for method in methods:
        for pattern in patterns:
            for runner in RUNNERS:
                if runner not in pythons or method not in METHODS[runner]:
                    continue
                extra = ["--exact"] if runner == "engine-exact" else []
                if runner == "engine" and engine_dense_pending:
                    extra, engine_dense_pending = ["--dense"], False
                runs.append(run_child(runner, method, pattern, args, pythons[runner], extra))
                add_ratios(runs)
                write_json(
                    args, runs, [], time.perf_counter() - t_start, methods, patterns, list(pythons), notes, partial=True
                )  # partial figures survive a stop
    total = time.perf_counter() - t_start

    add_ratios(runs)
    print_tables(runs, args.eval_windows, args.seqlen)
    checks = check_targets(runs)
    for r in runs:
        if "dense_perplexity" in r:
            print(f"\nengine's own dense perplexity: {r['dense_perplexity']:.3f}")
    print(f"\nbenchmark wall time {total / 60:.1f} min")
    write_json(args, runs, checks, total, methods, patterns, list(pythons), notes)
    return 1 if any("error" in r for r in runs) else 0


def write_json(args, runs, checks, total, methods, patterns, runners, notes, partial=False) -> None:
    if not args.json:
        return
    import torch

    payload = {
        "protocol": "P",
        "partial": partial,
        "config": {k: v if isinstance(v, (int, float, bool)) or v is None else str(v) for k, v in vars(args).items()},
        "methods": methods,
        "patterns": patterns,
        "runners": runners,
        "notes": notes,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "fixed": {f"{m} {p}": v for (m, p), v in FIXED.items()},
        "fixed_llmcompressor": {f"{m} {p}": v for (m, p), v in FIXED_LLMC.items()},
        "runs": runs,
        "targets": checks,
        "wall_seconds": total,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2))
    if not partial:
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())
