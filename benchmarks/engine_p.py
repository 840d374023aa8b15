"""Protocol P through this project's engine (worker.engine.pipeline.run_job), one run per process.

    python benchmarks/engine_p.py --method sparsegpt --sparsity 2:4 [--dense] [--json OUT]

The job is the CLI's `sparsegpt prune MODEL_DIR --sparsity S --calibration calibration.txt
--nsamples 32 --seqlen 512 --seed 0 --eval eval.txt --eval-windows 40 --device cpu`, fp32, 2
threads. Figures come from the engine's report (prune seconds, perplexity, peak memory); the
process's peak RSS is read when the engine reports its first evaluation event (so it is the
peak after pruning, as in ../shared/BENCHMARK.md) and again at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_sparsegpt as ref  # noqa: E402

from worker.engine.contract.method_table import METHOD_NAMES  # noqa: E402


def _stage(event) -> str:
    if isinstance(event, dict):
        value = event.get("stage", "")
    else:
        value = getattr(event, "stage", "")
    return str(getattr(value, "value", value) or "").lower()


def run(
    method: str,
    pattern: str,
    *,
    model_path=ref.DEFAULT_MODEL,
    calibration=ref.DATA / "calibration.txt",
    eval_file=ref.DATA / "eval.txt",
    nsamples: int = 32,
    seqlen: int = 512,
    seed: int = 0,
    eval_limit: int | None = 40,
    blocksize: int = 128,
    percdamp: float = 0.01,
    threads: int = 2,
    dense: bool = False,
    do_eval: bool = True,
    exact: bool = False,
) -> dict:
    import torch

    from worker.engine.contract.spec import JobSpec
    from worker.engine.pipeline import RunOptions, run_job

    torch.set_num_threads(threads)
    eval_key = str(eval_file)
    job = JobSpec.from_flat(
        model=str(model_path),
        sparsity=pattern,
        method=method,
        dataset=str(calibration),
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        blocksize=blocksize,
        percdamp=percdamp,
        datasets=[eval_key] if do_eval else [],
        max_windows=eval_limit,
        dense=dense and do_eval,
        dtype="float32",
        exact=exact,
    )
    options = RunOptions(device="cpu")

    marks: dict = {"stages": []}

    def on_progress(event) -> None:
        stage = _stage(event)
        if stage and (not marks["stages"] or marks["stages"][-1] != stage):
            marks["stages"].append(stage)
        # the first evaluation after the prune (a dense evaluation comes before it)
        if "eval" in stage and any("prun" in s for s in marks["stages"]) and "peak_after_prune" not in marks:
            marks["peak_after_prune"] = ref.peak_rss_bytes()

    t0 = time.perf_counter()
    report = run_job(job, options, on_progress=on_progress)
    wall = time.perf_counter() - t0

    seconds = report.get("seconds", {})
    result = {
        "method": method,
        "pattern": pattern,
        "runner": "engine",
        "prune_seconds": seconds.get("prune"),
        "seconds": seconds,
        "wall_seconds": wall,
        "sparsity": report.get("sparsity"),
        "engine_peak_memory_bytes": report.get("peak_memory_bytes"),
        # on CPU the engine's own figure is the process's peak RSS right after the prune
        "peak_rss_after_prune": report.get("peak_memory_bytes") or marks.get("peak_after_prune"),
        "peak_rss_at_eval_start": marks.get("peak_after_prune"),
        "peak_rss": ref.peak_rss_bytes(),
        "stages": marks["stages"],
    }
    layers = report.get("layers") or []
    if layers and all("seconds" in layer for layer in layers):
        result["seconds_solve"] = sum(layer["seconds"] for layer in layers)
    result["layers"] = layers
    ppl = report.get("perplexity", {})
    if eval_key in ppl:
        result["perplexity"] = ppl[eval_key]
        result["eval_seconds"] = seconds.get("eval")
    dense_ppl = report.get("dense_perplexity", {})
    if eval_key in dense_ppl:
        result["dense_perplexity"] = dense_ppl[eval_key]
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="this project's engine on protocol P")
    p.add_argument("--method", default="sparsegpt", choices=METHOD_NAMES)
    p.add_argument("--sparsity", default="0.5")
    ref.add_protocol_args(p)
    p.add_argument("--dense", action="store_true", help="let the engine evaluate the dense model too")
    p.add_argument("--exact", action="store_true", help="the engine's exact mode (the reference's arithmetic)")
    a = p.parse_args(argv)
    result = run(
        a.method,
        a.sparsity,
        model_path=a.model,
        calibration=a.calibration,
        eval_file=a.eval_file,
        nsamples=a.nsamples,
        seqlen=a.seqlen,
        seed=a.seed,
        eval_limit=a.eval_windows,
        blocksize=a.blocksize,
        percdamp=a.percdamp,
        threads=a.threads,
        dense=a.dense,
        do_eval=not a.no_eval,
        exact=a.exact,
    )
    print(json.dumps(result, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
