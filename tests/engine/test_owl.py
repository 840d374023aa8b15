"""Non-uniform sparsity over the blocks (issue 12, item 1): OWL's profile and a user's own, on tiny
random models; the options refused with one reason where they cannot apply; 60-80% accepted."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

from tests.support.tiny_models import make_tiny_model, sample_text
from worker.engine.architectures import adapter_for, prunable_linears, weight_matrix
from worker.engine.cli import build_parser, main, spec_data
from worker.engine.contract.spec import JobSpec
from worker.engine.errors import InvalidJob
from worker.engine.owl import owl_targets
from worker.engine.pipeline import RunOptions, run_job
from worker.engine.report_text import summary

BLOCKS, PLANTED = 4, 3
DEVICE = os.environ.get("SPARSEGPT_TEST_DEVICE", "cpu")  # as tests/engine/test_driver.py


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("owl")
    (d / "cal.txt").write_text(sample_text(), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def planted(workdir):
    """A 4-block tiny LLaMA in which the last block has 3% of its weights made 25x larger: outliers.
    (The last one: planted in an earlier block, they also make outlier channels in the residual
    stream that the later blocks read, and a later block can come out with the most outliers.)"""
    plain = make_tiny_model(workdir / "plain", "llama", blocks=BLOCKS)
    model = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    for module in prunable_linears(adapter_for(model).blocks[PLANTED]).values():
        W = module.weight.data
        W[torch.rand(W.shape, generator=generator) < 0.03] *= 25
    out = workdir / "planted"
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(plain).save_pretrained(out)
    return out


def run(model_dir, workdir, **fields) -> dict:
    spec = JobSpec.from_flat(
        **{
            "model": str(model_dir),
            "sparsity": 0.7,
            "dataset": str(workdir / "cal.txt"),
            "nsamples": 8,
            "seqlen": 64,
            "datasets": [],
            "dtype": "float32",
            **fields,
        }
    )
    return run_job(spec, RunOptions(device=DEVICE))


def weighted_mean(values, sizes) -> float:
    return sum(v * n for v, n in zip(values, sizes)) / sum(sizes)


def test_the_profile_keeps_the_parameter_weighted_mean_and_orders_by_outliers():
    ratios, sizes = [1.0, 5.0, 2.0, 3.5], [100, 100, 100, 100]
    targets = owl_targets(ratios, sizes, 0.7, 0.08)
    assert weighted_mean(targets, sizes) == pytest.approx(0.7, abs=1e-12)
    assert sum(targets) / len(targets) == pytest.approx(0.7, abs=1e-12)  # equal blocks: the plain mean too
    assert max(targets) - min(targets) == pytest.approx(2 * 0.08)  # the paper's span, 2 lambda
    assert sorted(range(4), key=lambda b: targets[b]) == sorted(range(4), key=lambda b: -ratios[b])
    # blocks of different sizes (a layer selection): the whole model's sparsity is still the target
    uneven = [300, 100, 50, 100]
    assert weighted_mean(owl_targets(ratios, uneven, 0.6, 0.1), uneven) == pytest.approx(0.6, abs=1e-12)
    assert owl_targets([2.0, 2.0, 2.0], [1, 1, 1], 0.8, 0.08) == [0.8, 0.8, 0.8]  # nothing to tell apart
    assert owl_targets(ratios, sizes, 0.7, 0.0) == [0.7] * 4


def test_targets_outside_0_1_are_refused_with_the_numbers():
    with pytest.raises(
        InvalidJob,
        match=r"sparsity_profile owl: at sparsity 0.9 with lambda 0.2 the blocks' "
        r"targets span 0\.8000\.\.1\.2000, and block 0's 1\.2000 is not strictly between 0 and 1; lower owl.lambda",
    ):
        owl_targets([0.0, 1.0, 1.0, 1.0], [1, 1, 1, 1], 0.9, 0.2)


def test_owl_prunes_the_planted_outlier_block_least_and_hits_every_target(planted, workdir):
    report = run(planted, workdir, sparsity_profile="owl", method="sparsegpt")
    profile = report["profile"]
    assert profile["profile"] == "owl" and (profile["m"], profile["lambda"]) == (5.0, 0.08)
    ratios, targets, achieved = profile["outlier_ratio"], profile["targets"], profile["achieved"]
    assert max(range(BLOCKS), key=lambda b: ratios[b]) == PLANTED
    assert min(range(BLOCKS), key=lambda b: targets[b]) == PLANTED
    assert ratios[PLANTED] > 2 * max(r for b, r in enumerate(ratios) if b != PLANTED)
    for b in range(BLOCKS):  # more outliers, fewer zeros
        for c in range(BLOCKS):
            if ratios[b] > ratios[c]:
                assert targets[b] < targets[c]
    assert sum(targets) / BLOCKS == pytest.approx(0.7, abs=1e-9)  # blocks of one size: plain = weighted mean
    # every block pruned to its own target (SparseGPT prunes floor(N*s)+1 per column block), overall 0.7
    assert achieved == pytest.approx(targets, abs=2e-3)
    assert report["sparsity"] == pytest.approx(0.7, abs=2e-3)
    for layer in report["layers"]:
        assert layer["target"] == targets[layer["block"]]
        assert layer["sparsity"] == pytest.approx(layer["target"], abs=2e-3), layer["name"]
    assert report["seconds"]["profile"] > 0  # the extra pass over the dense model, timed on its own
    assert "sparsity profile owl, M 5, lambda 0.08" in summary(report)


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_owl_with_the_baselines(planted, workdir, method):
    report = run(planted, workdir, sparsity_profile="owl", method=method, sparsity=0.6)
    targets, achieved = report["profile"]["targets"], report["profile"]["achieved"]
    assert min(range(BLOCKS), key=lambda b: targets[b]) == PLANTED
    assert sum(targets) / BLOCKS == pytest.approx(0.6, abs=1e-9)
    # magnitude: per layer, floor(N*s); Wanda: per row of 64 (or 160) inputs, floor(cols*s)
    assert achieved == pytest.approx(targets, abs=1e-3 if method == "magnitude" else 1 / 64)


def test_a_users_profile_is_applied_as_given(planted, workdir, tmp_path):
    given = [0.55, 0.8, 0.7, 0.65]
    report = run(planted, workdir, sparsity_profile=given)
    assert report["profile"]["profile"] == "list" and report["profile"]["targets"] == given
    assert report["profile"]["achieved"] == pytest.approx(given, abs=2e-3)
    model = transformers.AutoModelForCausalLM.from_pretrained(planted, dtype=torch.float32)  # dense: untouched
    sizes = [sum(weight_matrix(m).numel() for m in prunable_linears(b).values()) for b in adapter_for(model).blocks]
    assert report["sparsity"] == pytest.approx(weighted_mean(given, sizes), abs=2e-3)
    with pytest.raises(InvalidJob, match="sparsity_profile has 3 values but the model has 4 decoder blocks"):
        run(planted, workdir, sparsity_profile=[0.5, 0.6, 0.7])


def test_owl_with_a_layer_selection_profiles_only_the_pruned_blocks(planted, workdir):
    report = run(planted, workdir, sparsity_profile="owl", first_block=1, method="magnitude")
    profile = report["profile"]
    assert profile["targets"][0] is None and profile["outlier_ratio"][0] is None
    assert sum(profile["targets"][1:]) / 3 == pytest.approx(0.7, abs=1e-9)
    assert min(range(1, BLOCKS), key=lambda b: profile["targets"][b]) == PLANTED


def test_uniform_reports_the_target_per_block(planted, workdir):
    report = run(planted, workdir, method="magnitude", sparsity=0.8)
    assert report["profile"]["profile"] == "uniform" and report["profile"]["targets"] == [0.8] * BLOCKS
    assert report["profile"]["achieved"] == pytest.approx([0.8] * BLOCKS, abs=1e-3)
    assert "profile" not in report["seconds"]


NM_REFUSAL = "sparsity_profile owl needs an unstructured sparsity (0.7), not 2:4"


def test_a_non_uniform_profile_with_n_m_is_refused_in_the_spec():
    with pytest.raises(ValueError, match=r"sparsity_profile owl needs an unstructured sparsity \(0.7\), not 2:4"):
        JobSpec(model="org/name", sparsity="2:4", sparsity_profile="owl")
    with pytest.raises(ValueError, match="sparsity_profile per block needs an unstructured sparsity"):
        JobSpec(model="org/name", sparsity="4:8", sparsity_profile=[0.5, 0.5])
    assert JobSpec(model="org/name", sparsity="2:4", sparsity_profile="uniform").sparsity == "2:4"


def test_the_cli_refuses_owl_with_2_4_in_one_line(capsys):
    assert main(["org/name", "--sparsity", "2:4", "--sparsity-profile", "owl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparsegpt prune: error: --sparsity-profile: ")
    assert NM_REFUSAL in err


def test_the_api_refuses_owl_with_2_4(tmp_path):
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.main import create_app

    settings = Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:6379/13", auth="off", queue="owl-test")
    with TestClient(create_app(settings)) as client:
        answer = client.post("/api/v1/jobs", json={"model": "org/name", "sparsity": "2:4", "sparsity_profile": "owl"})
    assert answer.status_code == 422 and NM_REFUSAL in answer.text


def test_the_cli_reads_the_options_and_a_profile_file(tmp_path, capsys):
    def spec(*args):
        return JobSpec.model_validate(spec_data(build_parser().parse_args(["org/name", *args])))

    s = spec("--sparsity", "0.7", "--sparsity-profile", "owl", "--owl-m", "7", "--owl-lambda", "0.1")
    assert (s.sparsity_profile, s.owl.m, s.owl.lambda_) == ("owl", 7.0, 0.1)
    assert spec("--sparsity-profile", "0.6, 0.7,0.8").sparsity_profile == (0.6, 0.7, 0.8)
    (tmp_path / "p.json").write_text(json.dumps([0.5, 0.75]))
    assert spec("--sparsity-profile", f"@{tmp_path / 'p.json'}").sparsity_profile == (0.5, 0.75)
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    assert main(["org/name", "--sparsity-profile", f"@{tmp_path / 'bad.json'}"]) == 2
    assert "must hold a JSON list" in capsys.readouterr().err
    assert main(["org/name", "--sparsity-profile", "0.5,1.5"]) == 2
    assert "sparsity_profile value 1.5 (block 1) is out of range" in capsys.readouterr().err
    assert main(["org/name", "--owl-lambda", "0.5"]) == 2
    assert "--owl-lambda: Must be less than 0.5" in capsys.readouterr().err


def test_lambda_is_its_json_name():
    s = JobSpec.model_validate(
        {"model": "org/name", "sparsity": 0.7, "sparsity_profile": "owl", "owl": {"m": 3, "lambda": 0.12}}
    )
    assert (s.owl.m, s.owl.lambda_) == (3.0, 0.12)
    assert JobSpec.model_validate(s.model_dump(mode="json")) == s


@pytest.mark.parametrize("target", ["0.6", "0.7", "0.8", "80%"])
def test_higher_targets_are_accepted_by_the_cli_the_spec_and_the_form(target):
    from app.web.forms import FORM_DEFAULTS, spec_body

    expected = float(target.rstrip("%")) / (100 if target.endswith("%") else 1)
    from_cli = JobSpec.model_validate(spec_data(build_parser().parse_args(["org/name", "--sparsity", target])))
    from_form = JobSpec.model_validate(
        spec_body({**FORM_DEFAULTS, "model": "org/name", "sparsity": target, "sparsity_profile": "owl"})
    )
    assert from_cli.sparsity == from_form.sparsity == JobSpec(model="org/name", sparsity=target).sparsity == expected
    assert from_form.sparsity_profile == "owl"


@pytest.mark.parametrize(
    "stored",
    [
        {"model": "org/name", "sparsity": 0.7, "sparsity_profile": "owl", "owl": {"m": 7, "lambda": 0.05}},
        {"model": "org/name", "sparsity": 0.7, "sparsity_profile": [0.6, 0.75, 0.8]},
    ],
)
def test_the_form_shows_and_takes_back_a_profile(stored):
    """Clone: a stored spec put in the form and submitted unchanged is the same spec."""
    from app.web.forms import form_from_spec, spec_body

    dumped = JobSpec.model_validate(stored).model_dump(mode="json")
    form = form_from_spec(dumped)
    assert form["sparsity_profile"] in ("owl", "[0.6, 0.75, 0.8]")
    assert JobSpec.model_validate(spec_body(form)).model_dump(mode="json") == dumped


def test_the_job_page_chart_draws_target_and_achieved_per_block():
    from app.web.charts import profile_chart

    svg = str(profile_chart({"profile": "owl", "targets": [None, 0.62, 0.78], "achieved": [None, 0.6201, 0.7803]}))
    assert "target vs achieved" in svg and "owl" in svg
    assert svg.count('class="bar-target"') == 2 and svg.count('class="bar-achieved"') == 2  # block 0 left dense
    assert "block 1: target 62.00%" in svg and "block 2: achieved 78.03%" in svg
    assert profile_chart(None) is None and profile_chart({"targets": [None], "achieved": [None]}) is None
    svg = str(profile_chart({"profile": "<script>", "targets": [0.5, 0.6], "achieved": [0.5, 0.6]}))
    assert "<script>" not in svg and "&lt;script&gt;" in svg
