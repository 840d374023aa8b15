"""Protocol P through llm-compressor (the peer), one method/pattern per process.

Runs in its own interpreter: llm-compressor pins transformers/torch versions that the
project's venv does not have, so it lives in .venv-bench (see benchmarks/README.md):

    .venv-bench/bin/python benchmarks/llmcompressor_p.py --method sparsegpt --sparsity 2:4 --json OUT

Calibration windows are drawn exactly as the reference draws them (the same helper as
reference_sparsegpt.py) and handed to `oneshot` pre-tokenized and unshuffled; evaluation is the
reference's perplexity on the same windows. Prune seconds are the whole `oneshot` call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_sparsegpt as ref  # noqa: E402  (torch + transformers only)


def build_recipe(method: str, pattern: str, percdamp: float, blocksize: int):
    sparsity, n, m = ref.parse_pattern(pattern)
    structure = f"{n}:{m}" if n else "0:0"
    common = dict(sparsity=sparsity, mask_structure=structure, targets=["Linear"],
                  ignore=["re:.*lm_head"])
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        return SparseGPTModifier(block_size=blocksize, dampening_frac=percdamp, **common)
    if method == "wanda":
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

        return WandaPruningModifier(**common)
    raise SystemExit(f"llm-compressor runner: unsupported method {method!r}")


def run(method: str, pattern: str, *, model_path=ref.DEFAULT_MODEL,
        calibration=ref.DATA / "calibration.txt", eval_file=ref.DATA / "eval.txt",
        nsamples: int = 32, seqlen: int = 512, seed: int = 0, eval_limit: int | None = 40,
        blocksize: int = 128, percdamp: float = 0.01, threads: int = 2, do_eval: bool = True) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    import llmcompressor

    torch.set_num_threads(threads)
    model = ref.load_model(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    samples = ref.calibration_samples(ref.tokenize_file(tokenizer, calibration), nsamples, seqlen, seed)
    rows = [s[0].tolist() for s in samples]
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})

    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset,
            recipe=build_recipe(method, pattern, percdamp, blocksize),
            num_calibration_samples=nsamples, max_seq_length=seqlen,
            shuffle_calibration_samples=False, batch_size=1)
    prune_seconds = time.perf_counter() - t0
    model.eval()

    result = {"method": method, "pattern": pattern, "runner": "llm-compressor",
              "version": getattr(llmcompressor, "__version__", "?"),
              "prune_seconds": prune_seconds, "peak_rss_after_prune": ref.peak_rss_bytes(),
              "sparsity": ref.achieved_sparsity(model)}
    if do_eval:
        t0 = time.perf_counter()
        windows = ref.eval_windows(ref.tokenize_file(tokenizer, eval_file), seqlen, eval_limit)
        result["perplexity"] = ref.perplexity(model, windows)
        result["eval_seconds"] = time.perf_counter() - t0
    result["peak_rss"] = ref.peak_rss_bytes()
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="llm-compressor SparseGPT / Wanda on protocol P")
    p.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda"])
    p.add_argument("--sparsity", default="0.5")
    ref.add_protocol_args(p)
    a = p.parse_args(argv)
    result = run(a.method, a.sparsity, model_path=a.model, calibration=a.calibration,
                 eval_file=a.eval_file, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed,
                 eval_limit=a.eval_windows, blocksize=a.blocksize, percdamp=a.percdamp,
                 threads=a.threads, do_eval=not a.no_eval)
    print(json.dumps(result, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
