"""Protocol P through llm-compressor (the peer), one method/pattern per process.

Runs in its own interpreter: llm-compressor pins transformers/torch versions that the
project's venv does not have, so it lives in .venv-bench (see benchmarks/README.md):

    .venv-bench/bin/python benchmarks/llmcompressor_p.py --method sparsegpt --sparsity 2:4 --json OUT
    .venv-bench/bin/python benchmarks/llmcompressor_p.py --method gptq --quantize W4A16 --group-size 64 \
        --output DIR --json OUT                      # GPTQModifier alone (no pruning)
    .venv-bench/bin/python benchmarks/llmcompressor_p.py --method sparsegpt --sparsity 2:4 --quantize W4A16 \
        --group-size 64 --output DIR                 # SparseGPTModifier then GPTQModifier
    .venv-bench/bin/python benchmarks/llmcompressor_p.py --method fp8 --output DIR   # FP8_DYNAMIC, no data

Calibration windows are drawn exactly as the reference draws them (the same helper as
reference_sparsegpt.py) and handed to `oneshot` pre-tokenized and unshuffled; evaluation is the
reference's perplexity on the same windows. Prune seconds are the whole `oneshot` call.

With quantization (``--quantize``, or method fp8) the model is saved with ``save_compressed=True``
to ``--output`` (save seconds apart), and the figures are the saved checkpoint's: it is loaded
back (transformers decompresses it at the first forward) and evaluated, and benchmarks/ct_stats.py
reports its directory and decoder-weight bytes and the sparsity that survives in it (the
dequantized decoder Linear weights' exact zeros).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_sparsegpt as ref  # noqa: E402  (torch + transformers only)

QUANT_SCHEMES = {"W4A16": 4, "W8A16": 8}  # symmetric INT weights, no activation quantization


def gptq_modifier(scheme: str, group_size: int, percdamp: float, blocksize: int, actorder: str | None):
    """GPTQModifier on every Linear but lm_head, the preset's grid with ``group_size`` (SmolLM2's
    576-wide layers need 64; -1 = per output channel); ``actorder`` None leaves its default."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    if scheme not in QUANT_SCHEMES:
        raise SystemExit(f"llm-compressor runner: GPTQ schemes are {', '.join(QUANT_SCHEMES)}, not {scheme!r}")
    weights = dict(num_bits=QUANT_SCHEMES[scheme], type="int", symmetric=True, dynamic=False)
    weights.update(
        strategy="channel" if group_size == -1 else "group", group_size=None if group_size == -1 else group_size
    )
    groups = {"group_0": {"targets": ["Linear"], "weights": weights, "format": "pack-quantized"}}
    extra = {} if actorder is None else {"actorder": None if actorder == "none" else actorder}
    return GPTQModifier(
        config_groups=groups, ignore=["lm_head"], block_size=blocksize, dampening_frac=percdamp, **extra
    )


def fp8_modifier():
    """FP8_DYNAMIC: per-channel FP8 weights (no data), dynamic per-token FP8 activations."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return QuantizationModifier(targets=["Linear"], scheme="FP8_DYNAMIC", ignore=["lm_head"])


def build_recipe(method: str, pattern: str, percdamp: float, blocksize: int):
    if method == "fp8":
        return fp8_modifier()
    if method == "gptq":
        raise SystemExit("llm-compressor runner: method gptq needs --quantize")
    sparsity, n, m = ref.parse_pattern(pattern)
    structure = f"{n}:{m}" if n else "0:0"
    common = dict(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        return SparseGPTModifier(block_size=blocksize, dampening_frac=percdamp, **common)
    if method == "wanda":
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

        return WandaPruningModifier(**common)
    raise SystemExit(f"llm-compressor runner: unsupported method {method!r}")


def _recipe(
    method: str,
    pattern: str,
    percdamp: float,
    blocksize: int,
    quantize: str | None,
    group_size: int,
    actorder: str | None,
):
    """The modifiers: a pruning or fp8 one, then GPTQ when ``quantize`` (method gptq: GPTQ alone)."""
    recipe = [] if method == "gptq" else [build_recipe(method, pattern, percdamp, blocksize)]
    if quantize:
        recipe.append(gptq_modifier(quantize, group_size, percdamp, blocksize, actorder))
    return recipe


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
    do_eval: bool = True,
    quantize: str | None = None,
    group_size: int = 64,
    actorder: str | None = None,
    output: str | Path | None = None,
) -> dict:
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    saves = bool(quantize) or method == "fp8"
    if saves and not output:
        raise SystemExit("llm-compressor runner: a quantizing recipe needs --output DIR (the saved checkpoint)")
    torch.set_num_threads(threads)
    model = ref.load_model(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = {}
    if method != "fp8":  # FP8_DYNAMIC needs no calibration data
        samples = ref.calibration_samples(ref.tokenize_file(tokenizer, calibration), nsamples, seqlen, seed)
        rows = [s[0].tolist() for s in samples]
        data = dict(
            dataset=Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}),
            num_calibration_samples=nsamples,
            max_seq_length=seqlen,
            shuffle_calibration_samples=False,
            batch_size=1,
        )

    t0 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        recipe=_recipe(method, pattern, percdamp, blocksize, quantize, group_size, actorder),
        **data,
    )
    prune_seconds = time.perf_counter() - t0
    model.eval()

    result = {
        "method": method,
        "pattern": pattern if method != "gptq" else "-",
        "runner": "llm-compressor",
        "quantize": "FP8_DYNAMIC" if method == "fp8" else quantize,
        "group_size": group_size if quantize else None,
        "actorder": actorder if quantize else None,
        "version": getattr(llmcompressor, "__version__", "?"),
        "prune_seconds": prune_seconds,
        "peak_rss_after_prune": ref.peak_rss_bytes(),
        "sparsity": ref.achieved_sparsity(model),
    }
    if saves:
        result.update(_save_and_reload(model, tokenizer, Path(output)))
        model = result.pop("model")
    if do_eval:
        t0 = time.perf_counter()
        windows = ref.eval_windows(ref.tokenize_file(tokenizer, eval_file), seqlen, eval_limit)
        result["perplexity"] = ref.perplexity(model, windows)
        result["eval_seconds"] = time.perf_counter() - t0
    result["peak_rss"] = ref.peak_rss_bytes()
    return result


def _save_and_reload(model, tokenizer, output: Path) -> dict:
    """Save compressed (llm-compressor's wrapped save_pretrained), measure the directory, load it back."""
    import torch
    from ct_stats import checkpoint_stats
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model.save_pretrained(output, save_compressed=True)
    tokenizer.save_pretrained(output)
    saved = {"output": str(output), "save_seconds": time.perf_counter() - t0, **checkpoint_stats(output)}
    reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    reloaded.config.use_cache = False
    return {**saved, "model": reloaded.eval()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="llm-compressor SparseGPT / Wanda / GPTQ / FP8_DYNAMIC on protocol P")
    p.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "gptq", "fp8"])
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--quantize", choices=sorted(QUANT_SCHEMES), help="then GPTQModifier with this scheme")
    p.add_argument("--group-size", type=int, default=64, help="GPTQ's group size (-1: per output channel)")
    p.add_argument(
        "--actorder", choices=["static", "weight", "none"], help="GPTQModifier's actorder (default: its own, 'static')"
    )
    p.add_argument("--output", help="the compressed checkpoint's directory (quantizing recipes)")
    ref.add_protocol_args(p)
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
        do_eval=not a.no_eval,
        quantize=a.quantize,
        group_size=a.group_size,
        actorder=a.actorder,
        output=a.output,
    )
    print(json.dumps(result, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
