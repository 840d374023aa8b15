"""CUDA timings and the peak-memory check on a randomly initialised 1B-class LLaMA (timings only).

Runs, in one process on one GPU, our engine (the model on the CPU, one block at a time on the
GPU) and the plain reference procedure of benchmarks/reference_sparsegpt.py (whole model on
the GPU, one sample per forward, one Hessian per Linear) on the same calibration windows, and
prints prune seconds, their ratio, and our peak allocated GPU memory against the bound of
issue 6: one block's weights + the calibration activations (a block's inputs and outputs) +
the largest Hessian, plus 10%.

    python benchmarks/cuda_1b.py --calibration FILE.txt [--nsamples 128 --seqlen 2048] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# TinyLlama-1.1B's shape: 22 blocks, hidden 2048, MLP 5632, 32 heads, 4 KV heads.
SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)


SMALL = dict(
    SHAPE, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2
)  # --small: a dry run of this script on any machine


def build_model(directory: Path, shape: dict, device: str) -> Path:
    import transformers

    from tests.support.tiny_models import make_tokenizer

    config = transformers.LlamaConfig(**shape, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU (fast), save from the CPU
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.to("cpu").save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


def memory_bound(model_dir: Path, nsamples: int, seqlen: int) -> dict:
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    h, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    block_params = h * (h + 2 * kv + h) + 3 * h * f + 2 * h
    parts = {
        "block_weights": block_params * 2,
        "activations_in_out": 2 * nsamples * seqlen * h * 2,
        "largest_hessian": max(h, f) ** 2 * 4,
    }
    parts["bound_plus_10pct"] = int(1.1 * sum(parts.values()))
    return parts


def run_ours(model_dir: Path, calibration: str, pattern: str, nsamples: int, seqlen: int, device: str) -> dict:
    from worker.engine.contract.spec import JobSpec
    from worker.engine.pipeline import RunOptions, run_job

    spec = JobSpec.from_flat(
        model=str(model_dir),
        sparsity=pattern,
        dataset=calibration,
        nsamples=nsamples,
        seqlen=seqlen,
        datasets=[],
        dtype="float16" if device == "cuda" else "float32",
    )
    report = run_job(spec, RunOptions(device=device))
    return {
        "prune_s": report["seconds"]["prune"],
        "peak_bytes": report["peak_memory_bytes"],
        "sparsity": report["sparsity"],
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_reference(model_dir: Path, calibration: str, pattern: str, nsamples: int, seqlen: int, device: str) -> dict:
    import transformers

    from benchmarks import reference_sparsegpt as ref
    from worker.engine.calibration import calibration_windows

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    windows = calibration_windows(tokenizer, calibration, nsamples=nsamples, seqlen=seqlen, seed=0)
    samples = [w[None].to(device) for w in windows]
    sync(device)
    t0 = time.perf_counter()
    torch.set_default_device(device)  # the plain solver makes its Hessians with torch.zeros(...)
    try:
        ref.prune_sequential(model, samples, "sparsegpt", pattern, log=None)
    finally:
        torch.set_default_device("cpu")
    sync(device)
    seconds = time.perf_counter() - t0
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"prune_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", required=True)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--patterns", default="0.5,2:4")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--json")
    p.add_argument("--small", action="store_true", help="a 2-block model, for a dry run")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    torch.set_float32_matmul_precision("highest")
    model_dir = build_model(Path(tempfile.mkdtemp()) / "llama-random", SMALL if args.small else SHAPE, args.device)
    bound = memory_bound(model_dir, args.nsamples, args.seqlen)
    rows = []
    for pattern in args.patterns.split(","):
        ours = run_ours(model_dir, args.calibration, pattern, args.nsamples, args.seqlen, args.device)
        ref = (
            None
            if args.no_reference
            else run_reference(model_dir, args.calibration, pattern, args.nsamples, args.seqlen, args.device)
        )
        row = {
            "pattern": pattern,
            "ours": ours,
            "reference": ref,
            "time_ratio": ours["prune_s"] / ref["prune_s"] if ref else None,
            "peak_over_bound": ours["peak_bytes"] / bound["bound_plus_10pct"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\n{name} | {'small' if args.small else '1B-class'} random LLaMA | {args.nsamples} x {args.seqlen}")
    print("| pattern | ours prune s | reference prune s | ratio | peak GiB | bound GiB | peak / bound |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref_s = f"{r['reference']['prune_s']:.1f}" if r["reference"] else "-"
        ratio = f"{r['time_ratio']:.2f}" if r["time_ratio"] else "-"
        print(
            f"| {r['pattern']} | {r['ours']['prune_s']:.1f} | {ref_s} | {ratio} | "
            f"{r['ours']['peak_bytes'] / 2**30:.2f} | {bound['bound_plus_10pct'] / 2**30:.2f} | "
            f"{r['peak_over_bound']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"bound": bound, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
