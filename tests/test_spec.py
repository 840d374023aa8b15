"""The one job spec (worker/engine/contract/spec.py): the API, the new-job form and the CLI accept the
same inputs as the same spec, and refuse the same inputs with the same reasons."""

from __future__ import annotations

import html
import subprocess
import sys
import uuid

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.config import Settings
from app.main import create_app
from tests.support.paths import REPO
from worker.engine.cli import build_parser, spec_data
from worker.engine.contract.spec import JobSpec, field_paths
from worker.engine.contract.spec_fields import leaf_fields, plain_message

MODEL = "org/name"


def test_field_names_are_unique_across_sections():
    names = [path[-1] for path in field_paths(JobSpec)]
    assert len(names) == len(set(names))
    forms = [leaf.ui.form for leaf in leaf_fields() if leaf.ui.form]
    flags = [leaf.ui.cli for leaf in leaf_fields() if leaf.ui.cli]
    assert len(forms) == len(set(forms)) and len(flags) == len(set(flags))


def test_from_flat_and_nested_agree():
    flat = JobSpec.from_flat(model=MODEL, sparsity="2:4", nsamples=8, datasets=[], first_block=1)
    nested = JobSpec(
        model=MODEL, sparsity="2:4", calibration={"nsamples": 8}, evaluation={"datasets": []}, layers={"first_block": 1}
    )
    assert flat == nested
    with pytest.raises(TypeError, match="no field 'nsample'"):
        JobSpec.from_flat(model=MODEL, sparsity=0.5, nsample=8)


def test_spec_normalises_the_pattern():
    assert JobSpec(model=MODEL, sparsity="50%").sparsity == 0.5
    assert JobSpec(model=MODEL, sparsity=" 2 : 4 ").sparsity == "2:4"
    assert str(JobSpec(model=MODEL, sparsity="4:8").pattern) == "4:8"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("spec"),
        redis_url="redis://127.0.0.1:6379/12",
        auth="off",
        queue=f"spec-{uuid.uuid4().hex[:8]}",
    )
    with TestClient(create_app(settings)) as client:
        yield client


# (CLI arguments, the same as a JSON body's changes, the same as form fields)
CASES = [
    (["--sparsity", "3:2"], {"sparsity": "3:2"}, {"sparsity": "3:2"}),
    (["--nsamples", "0"], {"calibration": {"nsamples": 0}}, {"nsamples": "0"}),
    (["--method", "obs"], {"method": "obs"}, {"method": "obs"}),
    (
        ["--method", "wanda", "--wbits", "4"],
        {"method": "wanda", "solver": {"wbits": 4}},
        {"method": "wanda", "wbits": "4"},
    ),
    (
        ["--sparsity", "2:4", "--blocksize", "6"],
        {"sparsity": "2:4", "solver": {"blocksize": 6}},
        {"sparsity": "2:4", "blocksize": "6"},
    ),
    (
        ["--first-block", "3", "--last-block", "1"],
        {"layers": {"first_block": 3, "last_block": 1}},
        {"first_block": "3", "last_block": "1"},
    ),
    (["--first-block", "-1"], {"layers": {"first_block": -1}}, {"first_block": "-1"}),
    (["--percdamp", "nan"], {"solver": {"percdamp": "nan"}}, {"percdamp": "nan"}),
    (
        ["--sparsity", "2:4", "--sparsity-profile", "owl"],
        {"sparsity": "2:4", "sparsity_profile": "owl"},
        {"sparsity": "2:4", "sparsity_profile": "owl"},
    ),
    (["--sparsity-profile", "0.5,1.5"], {"sparsity_profile": [0.5, 1.5]}, {"sparsity_profile": "0.5, 1.5"}),
    (["--sparsity-profile", "owls"], {"sparsity_profile": "owls"}, {"sparsity_profile": "owls"}),
    (["--owl-lambda", "0.5"], {"owl": {"lambda": 0.5}}, {"owl_lambda": "0.5"}),
    (["--owl-m", "-1"], {"owl": {"m": -1}}, {"owl_m": "-1"}),
]


def form_fields(**changes) -> dict[str, str]:
    fields = {
        "model": MODEL,
        "sparsity": "0.5",
        "method": "sparsegpt",
        "calibration_source": "c4",
        "eval_sets": "wikitext2",
        "dense": "1",
        "nsamples": "128",
        "seed": "0",
        "blocksize": "128",
        "percdamp": "0.01",
        "dtype": "auto",
    }
    fields.update(changes)
    return fields


def api_body(**changes) -> dict:
    return {"model": MODEL, "sparsity": 0.5, **changes}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.engine.cli", MODEL, *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("args,body,form", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_the_same_input_is_refused_for_the_same_reason(client, args, body, form):
    api = client.post("/api/v1/jobs", json=api_body(**body))
    assert api.status_code == 422
    reasons = [plain_message(e) for e in api.json()["detail"]]
    assert len(reasons) == 1
    reason = reasons[0]
    page = client.post("/jobs/new", data=form_fields(**form))
    assert page.status_code == 422 and reason in html.unescape(page.text)
    result = cli(*args)
    assert result.returncode == 2 and result.stderr.count("error:") == 1
    assert reason in result.stderr, result.stderr
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(spec_data(build_parser().parse_args([MODEL, *args])))
    # The same words; an echo of the offending value, " (got ...)", is where the input was kept.
    assert [stem(plain_message(e)) for e in info.value.errors()] == [stem(r) for r in reasons]


def stem(reason: str) -> str:
    return reason.split(" (got ", 1)[0]


def test_the_same_input_is_accepted_as_the_same_spec(client):
    args = [
        "--sparsity",
        "4:8",
        "--method",
        "wanda",
        "--nsamples",
        "16",
        "--seqlen",
        "64",
        "--first-block",
        "1",
        "--last-block",
        "2",
        "--include",
        "*.mlp.*",
        "--exclude",
        "*.down_proj",
        "--eval-windows",
        "3",
    ]
    body = {
        "sparsity": "4:8",
        "method": "wanda",
        "calibration": {"nsamples": 16, "seqlen": 64},
        "layers": {"first_block": 1, "last_block": 2, "include": ["*.mlp.*"], "exclude": ["*.down_proj"]},
        "evaluation": {"max_windows": 3},
    }
    form = form_fields(
        sparsity="4:8",
        method="wanda",
        nsamples="16",
        seqlen="64",
        first_block="1",
        last_block="2",
        include="*.mlp.*",
        exclude="*.down_proj",
        max_windows="3",
    )
    from_cli = JobSpec.model_validate(spec_data(build_parser().parse_args([MODEL, *args]))).model_dump(mode="json")
    created = client.post("/api/v1/jobs", json=api_body(**body))
    assert created.status_code == 201, created.text
    page = client.post("/jobs/new", data=form, follow_redirects=False)
    assert page.status_code == 303, page.text
    from_form = client.get(f"/api/v1/jobs/{page.headers['location'].rsplit('/', 1)[-1]}").json()["spec"]
    assert created.json()["spec"] == from_cli == from_form
    assert from_cli["layers"] == {"first_block": 1, "last_block": 2, "include": ["*.mlp.*"], "exclude": ["*.down_proj"]}
