"""The layout fixtures of tests/engine/test_ct_layout.py, made by llm-compressor 0.14 itself.

Runs in .venv-bench (llm-compressor 0.14, compressed-tensors 0.19, transformers <= 5.17):

    .venv-bench/bin/python benchmarks/ct_layout_fixture.py            # every case
    .venv-bench/bin/python benchmarks/ct_layout_fixture.py --case llama_w4a16_g32

Each case builds a tiny random model from the transformers config written below (the test
builds the very same config from the fixture), quantizes it with llm-compressor's recipe on a
few rows of random token ids, saves it compressed (``save_compressed=True``), and writes
``tests/engine/data/ct_layout_<case>.json``: every saved tensor's name, shape and dtype, and
config.json's ``quantization_config`` block, with the library versions that wrote them. Values
(the weights, the scales) are not kept: the fixture is about the layout vLLM reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "engine" / "data"

# Tiny configs: every Linear's input width divisible by 32 (the W4A16 group), two blocks.
CONFIGS = {
    "llama": dict(
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        decoder_sparse_step=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
}
# case -> (config, scheme, group size); W4A16 with llm-compressor's GPTQModifier, FP8_DYNAMIC with
# its QuantizationModifier (no calibration data), as benchmarks/llmcompressor_p.py runs them.
CASES = {
    "llama_w4a16_g32": ("llama", "W4A16", 32),
    "llama_fp8_dynamic": ("llama", "FP8_DYNAMIC", -1),
    "qwen3_moe_w4a16_g32": ("qwen3_moe", "W4A16", 32),
    "qwen3_moe_fp8_dynamic": ("qwen3_moe", "FP8_DYNAMIC", -1),
}
DTYPE = "bfloat16"  # the model's dtype, so the scales' too
ROWS, SEQLEN, SEED = 8, 32, 0


def recipe(scheme: str, group_size: int):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = ["lm_head", "re:.*mlp.gate$"]  # the MoE router stays dense (llm-compressor's MoE examples)
    if scheme == "FP8_DYNAMIC":
        return QuantizationModifier(targets=["Linear"], scheme="FP8_DYNAMIC", ignore=ignore)
    weights = dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    groups = {"group_0": {"targets": ["Linear"], "weights": weights, "format": "pack-quantized"}}
    return GPTQModifier(config_groups=groups, ignore=ignore, actorder=None)


def tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer over the model's vocabulary (oneshot wants a processor; ids are given)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")


def make_case(case: str) -> dict:
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors import safe_open

    family, scheme, group_size = CASES[case]
    config_dict = CONFIGS[family]
    config = transformers.AutoConfig.for_model(**config_dict)
    torch.manual_seed(SEED)
    tmp_dir = tempfile.TemporaryDirectory()
    dense, out = Path(tmp_dir.name) / "dense", Path(tmp_dir.name) / "compressed"
    transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, DTYPE)).save_pretrained(dense)
    tokenizer = tiny_tokenizer(config.vocab_size)
    tokenizer.save_pretrained(dense)
    model = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=getattr(torch, DTYPE)).eval()
    data = {}
    if scheme != "FP8_DYNAMIC":
        g = torch.Generator().manual_seed(SEED)
        rows = torch.randint(0, config.vocab_size, (ROWS, SEQLEN), generator=g).tolist()
        data = dict(
            dataset=Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * SEQLEN] * ROWS}),
            num_calibration_samples=ROWS,
            max_seq_length=SEQLEN,
            shuffle_calibration_samples=False,
        )
    with tmp_dir:
        oneshot(model=model, tokenizer=tokenizer, recipe=recipe(scheme, group_size), **data)
        model.save_pretrained(out, save_compressed=True)
        tensors = {}
        for file in sorted(out.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    tensors[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        saved_config = json.loads((out / "config.json").read_text())
    return {
        "case": case,
        "config": config_dict,
        "dtype": DTYPE,
        "scheme": scheme,
        "group_size": group_size,
        "made_by": {
            "script": "benchmarks/ct_layout_fixture.py",
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "quantization_config": saved_config["quantization_config"],
        "tensors": dict(sorted(tensors.items())),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="llm-compressor 0.14's compressed layout of tiny models, as fixtures")
    p.add_argument("--case", action="append", choices=sorted(CASES), help="default: every case")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    failed = []
    for case in a.case or list(CASES):
        try:
            fixture = make_case(case)
        except Exception as exc:  # one case llm-compressor cannot do must not hide the others
            print(f"{case}: llm-compressor failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed.append(case)
            continue
        path = Path(a.out) / f"ct_layout_{case}.json"
        path.write_text(json.dumps(fixture, indent=1) + "\n")
        print(f"{case}: {len(fixture['tensors'])} tensors -> {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
