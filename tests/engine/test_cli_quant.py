"""``sparsegpt prune --quantize`` end to end, as a subprocess (issue 26): the compressed-tensors checkpoint
(the default format) and ``--format dense`` load with ``from_pretrained`` and are the model the report
measured; the summary states the scheme, the layers and each format's size; bad input is one line, exit 2,
in the spec's shared wording."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from tests.engine.test_cli import prune
from tests.support.tiny_models import make_tiny_model, sample_text
from worker.engine.calibration import evaluation_windows
from worker.engine.contract.spec_quant import ACTORDER_NM, FP8_GROUP, NO_SCHEME, WITH_REFIT


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-quant")
    make_tiny_model(d / "model", "llama")  # every Linear reads 64 or 128 inputs
    (d / "cal.txt").write_text(sample_text(), encoding="utf-8")
    return d


def run_quantized(files, out, *extra):
    report_path = out.parent / f"{out.name}.json"
    result = prune(
        files / "model",
        "--sparsity",
        "0.5",
        "--quantize",
        "W4A16",
        "--group-size",
        32,
        "--calibration",
        files / "cal.txt",
        "--nsamples",
        8,
        "--seqlen",
        64,
        "--eval",
        files / "cal.txt",
        "--eval-windows",
        3,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--output",
        out,
        "--report",
        report_path,
        "--quiet",
        *extra,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads(report_path.read_text())


def loaded_perplexity(directory, cal) -> float:
    """The reference's perplexity of the saved directory, loaded with no extra arguments, on the job's windows."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    nlls = []
    with torch.no_grad():
        for w in evaluation_windows(tokenizer, str(cal), seqlen=64, max_windows=3):
            logits = model(input_ids=w[None]).logits[0, :-1].float()
            nlls.append(torch.nn.functional.cross_entropy(logits, w[1:]).item())
    return math.exp(sum(nlls) / len(nlls))


def directory_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def test_quantize_writes_compressed_tensors_that_load_as_measured(files, tmp_path):
    out = tmp_path / "w4"
    stdout, report = run_quantized(files, out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 32
    [ppl] = report["perplexity"].values()
    assert loaded_perplexity(out, files / "cal.txt") == pytest.approx(ppl, rel=1e-5)
    q = report["quantization"]
    size = q["sizes"]["formats"]["compressed-tensors"]
    assert size["bytes"] == directory_bytes(out)
    # the summary: the scheme and how, the layers, what stayed in float and why, the format's bytes and ratio
    assert (
        "quantization W4A16 (group size 32, scales searched for the least rounding error): inside the SparseGPT solve"
        in stdout
    )
    assert "quantized 14 layers" in stdout and "left in float: lm_head (the output head" in stdout
    assert "format compressed-tensors: " in stdout and f"({size['bytes']} bytes), {size['ratio']:.3f}x" in stdout
    assert f"saved to {out} (compressed-tensors, W4A16" in stdout
    card = (out / "README.md").read_text()
    assert "vllm serve" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "the bytes come from the bits" in card and str(size["bytes"]) in card
    assert "dense checkpoint with zeros" not in card


def test_format_dense_writes_the_float_checkpoint_of_the_same_weights(files, tmp_path):
    out = tmp_path / "dense"
    stdout, report = run_quantized(files, out, "--format", "dense")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    [ppl] = report["perplexity"].values()
    assert loaded_perplexity(out, files / "cal.txt") == pytest.approx(ppl, rel=1e-5)
    formats = report["quantization"]["sizes"]["formats"]
    assert list(formats) == ["dense"] and formats["dense"]["bytes"] == directory_bytes(out)
    assert "format dense: " in stdout and "dense safetensors: the quantized weights as floats" in stdout
    # codes x scales: every row of a quantized weight takes at most 2^4 values per group of 32
    W = transformers.AutoModelForCausalLM.from_pretrained(out).model.layers[0].self_attn.q_proj.weight
    assert max(len(torch.unique(g)) for g in W.detach().reshape(-1, 32)) <= 16


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quantize", "FP8_DYNAMIC", "--group-size", "32"], FP8_GROUP.format(group_size=32)),
        (["--quantize", "W4A16", "--group-size", "48"], "quantization.group_size 48 does not divide the input width"),
        (["--quantize", "W4A16", "--actorder", "--sparsity", "2:4"], ACTORDER_NM),
        (["--group-size", "64"], NO_SCHEME),
        (["--quantize", "W4A16", "--refit", "reconstruct"], WITH_REFIT),
        (["--quantize", "W3A16"], "--quantize: Must be one of"),
        (["--format", "compressed-tensors", "--output", "OUT"], "--format compressed-tensors holds quantized weights"),
        (["--quantize", "W4A16", "--group-size", "32", "--format", "dense"], "--format says what --output writes"),
    ],
)
def test_bad_quantization_is_one_line_and_exit_2(files, tmp_path, args, message):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = prune(files / "model", "--calibration", files / "cal.txt", "--no-eval", "-q", "--device", "cpu", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "out").exists()
