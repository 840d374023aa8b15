"""Quantizing jobs (issue 26) through the pipeline: the checkpoint as saved is the model evaluated."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from pydantic import ValidationError

from tests.support.tiny_models import make_tiny_model, sample_text
from worker.engine.calibration import evaluation_windows
from worker.engine.contract.spec import JobSpec
from worker.engine.contract.spec_quant import group_size_message
from worker.engine.errors import InvalidJob
from worker.engine.pipeline import RunOptions, run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("quantized")
    (d / "cal.txt").write_text(sample_text(), encoding="utf-8")
    return d


def job(model, workdir, **fields):
    return JobSpec.from_flat(
        model=str(model),
        dataset=str(workdir / "cal.txt"),
        nsamples=8,
        seqlen=64,
        datasets=[str(workdir / "cal.txt")],
        max_windows=4,
        dtype="float32",
        **fields,
    )


def direct_perplexity(model, windows: torch.Tensor) -> float:
    nlls = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0, :-1].float()
            nlls.append(torch.nn.functional.cross_entropy(logits, w[1:]).item())
    return math.exp(sum(nlls) / len(nlls))


def check_saved(out, report, workdir):
    """Loads with no extra arguments; its perplexity on the job's windows is the report's."""
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    windows = evaluation_windows(tokenizer, str(workdir / "cal.txt"), seqlen=64, max_windows=4)
    [ppl] = report.perplexity.values()
    assert direct_perplexity(loaded, windows) == pytest.approx(ppl, rel=1e-5)
    return loaded


@pytest.mark.parametrize(
    "method, sparsity, scheme, group, how",
    [
        ("sparsegpt", "0.5", "W4A16", 32, "in-solve"),
        ("sparsegpt", "2:4", "W8A16", 32, "in-solve"),
        ("sparsegpt", "0", "W4A16", 32, "in-solve"),  # quantization only: GPTQ
        ("wanda", "0.5", "W4A16", -1, "round-to-nearest"),
        ("sparsegpt", "0.5", "FP8_DYNAMIC", -1, "in-solve"),
    ],
)
def test_quantized_job_saves_the_model_it_evaluated(method, sparsity, scheme, group, how, workdir, tmp_path):
    model = make_tiny_model(tmp_path / "m", "llama")
    out = tmp_path / "out"
    report = run(
        job(model, workdir, method=method, sparsity=sparsity, scheme=scheme, group_size=group),
        RunOptions(device="cpu", output=str(out)),
    )
    q = report.quantization
    assert (q.scheme, q.group_size, q.how, q.quantization_only) == (scheme, group, how, sparsity == "0")
    assert q.layers_quantized == 14 and [u["name"] for u in q.unquantized] == ["lm_head"]
    # the joint solve takes each Hessian from the layers before it as quantized: one pass a block
    one_pass = how == "in-solve"
    assert (q.blocks_one_pass, q.blocks_two_passes) == ((2, 0) if one_pass else (0, 2))
    assert {layer["passes"] for layer in report.to_dict()["layers"]} == {1 if one_pass else 2}
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
    loaded = check_saved(out, report, workdir)
    W = loaded.model.layers[0].self_attn.q_proj.weight  # decompressed at the first forward
    zeros = (W == 0).float().mean().item()
    if sparsity != "0":  # the pruned zeros survive on the grid (quantization only: zeros are codes rounded to 0)
        assert zeros >= 0.5 - 0.01
    bits = {"W4A16": 4, "W8A16": 8, "FP8_DYNAMIC": 8}[scheme]  # + one fp32 scale per group of a row
    if group == 32:
        assert q.sizes.decoder_weights_ratio == pytest.approx((bits / 8 + 4 / 32) / 2)
    else:  # one scale per row: at most 4 bytes per 64 weights here
        assert bits / 16 < q.sizes.decoder_weights_ratio <= (bits / 8 + 4 / 64) / 2
    # each format's size is the directory as written (card and report included), beside the dense model in fp16
    dense_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model).parameters())
    assert q.sizes.dense_fp16_bytes == 2 * dense_params
    written = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    assert q.sizes.formats["compressed-tensors"].bytes == written
    assert q.sizes.formats["compressed-tensors"].ratio == pytest.approx(written / (2 * dense_params), abs=1e-4)
    assert json.loads((out / "sparsegpt_report.json").read_text())["quantization"]["sizes"] == q.sizes.to_dict()
    from worker.engine.report_text import summary

    headline = summary(report).splitlines()[0]  # never "pruned" where no weight was
    assert ("quantization only, no weight pruned" in headline) == (sparsity == "0")
    assert ("pruned layers" in headline) == (sparsity != "0")
    assert ("2 blocks solved in one pass each" in summary(report)) == one_pass


def test_moe_experts_are_quantized_per_expert(workdir, tmp_path):
    model = make_tiny_model(tmp_path / "m", "qwen3_moe")
    out = tmp_path / "out"
    report = run(
        job(model, workdir, sparsity=0.5, scheme="W4A16", group_size=32), RunOptions(device="cpu", output=str(out))
    )
    assert report.quantization.experts_quantized > 0
    assert (report.quantization.blocks_one_pass, report.quantization.blocks_two_passes) == (0, 2)  # routed by value
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.0.gate_proj.weight_packed" in keys
    assert not [k for k in keys if ".experts." in k and k.endswith(".weight")]  # no expert left in float
    check_saved(out, report, workdir)


def test_both_formats_in_subdirectories(workdir, tmp_path):
    model = make_tiny_model(tmp_path / "m", "llama")
    out = tmp_path / "out"
    report = run(
        job(model, workdir, sparsity=0.5, scheme="W8A16", group_size=32),
        RunOptions(device="cpu", output=str(out), formats=("compressed-tensors", "dense")),
    )
    assert "quantization_config" not in json.loads((out / "dense" / "config.json").read_text())
    check_saved(out / "compressed-tensors", report, workdir)
    check_saved(out / "dense", report, workdir)  # the float weights are the same codes x scales
    formats = report.quantization.sizes.formats
    assert set(formats) == {"compressed-tensors", "dense"}
    for name, size in formats.items():
        assert size.bytes == sum(p.stat().st_size for p in (out / name).iterdir() if p.is_file())
    assert formats["compressed-tensors"].bytes < formats["dense"].bytes


def test_refused_before_it_runs(workdir, tmp_path):
    llama = make_tiny_model(tmp_path / "m", "llama")  # 64 wide
    with pytest.raises(InvalidJob, match="does not divide the input width"):
        run(job(llama, workdir, sparsity=0.5, scheme="W4A16", group_size=128), RunOptions(device="cpu"))
    gpt2 = make_tiny_model(tmp_path / "g", "gpt2")
    with pytest.raises(InvalidJob, match="Conv1D, not a Linear"):
        run(job(gpt2, workdir, sparsity=0.5, scheme="W4A16", group_size=32), RunOptions(device="cpu"))


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"sparsity": 0}, "sparsity 0 prunes nothing"),
        ({"sparsity": 0.5, "quantization": {"scheme": "FP8_DYNAMIC", "group_size": 128}}, "one scale per output"),
        ({"sparsity": "2:4", "quantization": {"scheme": "W4A16", "actorder": True}}, "N:M patterns cannot"),
        ({"sparsity": 0.5, "quantization": {"scheme": "W4A16"}, "solver": {"exact": True}}, "solver.exact"),
        ({"sparsity": 0.5, "quantization": {"scheme": "W4A16"}, "solver": {"wbits": 4}}, "two grids"),
        ({"sparsity": 0.5, "quantization": {"group_size": 64}}, "scheme is required"),
        ({"sparsity": 0.5, "quantization": {"scheme": "W4A16"}, "solver": {"refit": "reconstruct"}}, "set refit none"),
        ({"sparsity": 0.5, "quantization": {"scheme": "W3A16"}}, "W4A16"),
    ],
)
def test_spec_refusals(fields, reason):
    with pytest.raises(ValidationError, match=reason):
        JobSpec(model="org/name", **fields)


def test_group_size_check_from_config():
    smollm = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "head_dim": 64}
    message = group_size_message(smollm, 128)
    assert "576" in message and "64" in message and "128," not in message
    assert group_size_message(smollm, 64) is None and group_size_message(smollm, -1) is None
    assert JobSpec(model="org/name", sparsity="0", quantization={"scheme": "W4A16"}).quantization_only


def test_blocks_outside_the_selection_are_named_as_left_in_float(workdir, tmp_path):
    model = make_tiny_model(tmp_path / "m", "llama")  # 2 blocks of 7 Linears
    report = run(
        job(model, workdir, sparsity=0.5, scheme="W4A16", group_size=32, last_block=0), RunOptions(device="cpu")
    )
    q = report.quantization
    assert q.layers_quantized == 7 and not q.sizes.formats  # nothing saved: no format
    assert [u["name"] for u in q.unquantized] == ["lm_head", "the blocks outside 0..0"]
    assert "outside the layer selection" in q.unquantized[1]["reason"]
