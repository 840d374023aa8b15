"""Issue 26, measured: a refit with quantization on protocol P (SmolLM2-135M, 32 x 512 calibration,
40 x 512 evaluation windows), one CLI run per process, one after another:

- in-solve: ``sparsegpt prune MODEL --sparsity S --quantize W4A16 --group-size 64`` (the grid fitted and
  applied inside the SparseGPT solve, no refit);
- refit then round-to-nearest: the same with ``--refit reconstruct`` (the kept weights re-solved on the
  mask, then quantized to nearest on the same grid, the mask fixed).

Both evaluated as the checkpoint would load (compressed in memory). The decision this informed: the
spec now refuses sparsegpt + refit + quantization (worker/engine/contract/spec_quant.py, WITH_REFIT), so the
second run works only at a commit before that refusal (a5d01a8). Measured there, CPU, 2 shared cores,
``--last-block 5 --eval-windows 10`` (blocks 0-5 of 30, 10 windows; results/refit_quant_p.json): dense
33.26, in-solve 39.78, refit then round-to-nearest 41.49.

    nice python benchmarks/refit_quant_p.py [--patterns 0.5,2:4] [--json benchmarks/results/refit_quant_p.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "smollm2-135m"
DATA = Path(os.environ.get("SPARSEGPT_SHARED_DATA", REPO.parent / "shared" / "data")) / "protocol-p"


def one(
    pattern: str, refit: str, workdir: Path, dense: bool, last_block: int | None = None, eval_windows: int = 40
) -> dict:
    report = workdir / f"{pattern.replace(':', 'of')}-{refit}.json"
    cmd = [
        sys.executable,
        "-m",
        "worker.engine.cli",
        str(MODEL),
        "--sparsity",
        pattern,
        "--quantize",
        "W4A16",
        "--group-size",
        "64",
        "--refit",
        refit,
        "--calibration",
        str(DATA / "calibration.txt"),
        "--nsamples",
        "32",
        "--seqlen",
        "512",
        "--seed",
        "0",
        "--eval",
        str(DATA / "eval.txt"),
        "--eval-windows",
        str(eval_windows),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--threads",
        "2",
        "--quiet",
        "--report",
        str(report),
    ]
    if not dense:
        cmd.append("--no-dense-eval")
    if last_block is not None:  # a quicker look: only blocks 0..last_block pruned and quantized
        cmd += ["--last-block", str(last_block)]
    subprocess.run(cmd, cwd=REPO, check=True)
    data = json.loads(report.read_text())
    [ppl] = data["perplexity"].values()
    return {
        "pattern": pattern,
        "refit": refit,
        "how": data["quantization"]["how"],
        "perplexity": ppl,
        "dense_perplexity": next(iter(data["dense_perplexity"].values()), None),
        "prune_seconds": data["seconds"]["prune"],
        "refit_error": data.get("refit"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patterns", default="0.5,2:4")
    parser.add_argument("--json")
    parser.add_argument("--last-block", type=int, help="prune and quantize only blocks 0..N (a quicker look)")
    parser.add_argument("--eval-windows", type=int, default=40)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, pattern in enumerate(args.patterns.split(",")):
            for refit in ("none", "reconstruct"):
                runs.append(
                    one(
                        pattern,
                        refit,
                        Path(tmp),
                        dense=(i == 0 and refit == "none"),
                        last_block=args.last_block,
                        eval_windows=args.eval_windows,
                    )
                )
                print(json.dumps(runs[-1]), flush=True)
    if args.json:
        result = {
            "protocol": "P",
            "scheme": "W4A16",
            "group_size": 64,
            "last_block": args.last_block,
            "eval_windows": args.eval_windows,
            "runs": runs,
        }
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
