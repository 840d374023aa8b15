"""Numbers and text the job spec refuses with a plain reason, the same through the API (a real
server over HTTP), the new-job form's mapping and the CLI (issue 11, item 12).

Before: a 400-digit integer sparsity was a 500 (``float(10**400)`` overflows), NaN and 1e999 as
text were "sparsity nan is out of range", a 400-character sparsity was read whole, a 5000-digit
count said "Unable to parse input string as an integer", and a lone surrogate (what undecodable
bytes on a command line become) was accepted in the model path, the dataset paths and the globs.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from app.web import forms
from tests.support.paths import REPO
from worker.engine.cli import build_parser, describe, spec_data
from worker.engine.contract.spec import JobSpec
from worker.engine.contract.spec_fields import plain_message

MODEL = "org/name"

# id: (CLI arguments, the JSON body's changes, the form's changes, words of the reason)
CASES = {
    "400-digit-sparsity": (
        ["--sparsity", "1" * 400],
        {"sparsity": "1" * 400},
        {"sparsity": "1" * 400},
        "sparsity is 400 characters long",
    ),
    "nan-sparsity": (
        ["--sparsity", "NaN"],
        {"sparsity": "NaN"},
        {"sparsity": "NaN"},
        "sparsity must be a finite number",
    ),
    "infinite-sparsity": (
        ["--sparsity=-Infinity"],
        {"sparsity": "-Infinity"},
        {"sparsity": "-Infinity"},
        "sparsity must be a finite number",
    ),
    "1e999-sparsity": (
        ["--sparsity", "1e999"],
        {"sparsity": "1e999"},
        {"sparsity": "1e999"},
        "sparsity must be a finite number",
    ),
    "long-n-m": (
        ["--sparsity", "12345:123456"],
        {"sparsity": "12345:123456"},
        {"sparsity": "12345:123456"},
        "is neither a ratio",
    ),
    "1e999-percdamp": (
        ["--percdamp", "1e999"],
        {"solver": {"percdamp": "1e999"}},
        {"percdamp": "1e999"},
        "Must be a finite number",
    ),
    "5000-digit-nsamples": (
        ["--nsamples", "9" * 5000],
        {"calibration": {"nsamples": "9" * 5000}},
        {"nsamples": "9" * 5000},
        "Is too large a number",
    ),
}


def form_fields(**changes: str) -> dict[str, list[str]]:
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
    return {name: [value] for name, value in fields.items()}


def form_reasons(fields: dict[str, list[str]]) -> list[str]:
    """What the new-job form shows: its fields mapped onto the spec, the spec's errors by input."""
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(forms.spec_body(forms.form_values(fields)))
    return [message for messages in forms.field_errors(info.value.errors()).values() for message in messages]


def cli_line(*args: str) -> str:
    """The one line ``sparsegpt prune`` prints for refused arguments."""
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(spec_data(build_parser().parse_args([MODEL, *args])))
    return describe(info.value)


def cli_process(*args: str | bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.engine.cli", *args], cwd=REPO, capture_output=True, timeout=60)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_numbers_are_refused_with_the_same_plain_reason(service, case):
    args, body, form, words = CASES[case]
    response = service.client.post("/api/v1/jobs", json={"model": MODEL, "sparsity": 0.5, **body})
    assert response.status_code == 422, response.text[:300]
    reasons = [plain_message(e) for e in response.json()["detail"]]
    assert len(reasons) == 1 and words in reasons[0], reasons
    assert len(response.content) < 2000  # the 400 or 5000 digits are not sent back
    reason = reasons[0]
    assert any(reason in shown for shown in form_reasons(form_fields(**form))), form_reasons(form_fields(**form))
    assert reason in cli_line(*args)
    result = cli_process(MODEL, *args)
    stderr = result.stderr.decode()
    assert result.returncode == 2 and stderr.count("error:") == 1 and reason in stderr, stderr[:500]
    assert len(stderr) < 1000


@pytest.mark.parametrize("number", [10**400, -(10**400), 2, 10**12], ids=["1e400", "-1e400", "2", "1e12"])
def test_an_integer_sparsity_is_a_422_not_an_overflow(service, number):
    """A JSON integer too large for a float was a 500 (OverflowError in the spec's parser)."""
    body = b'{"model": "org/name", "sparsity": ' + str(number).encode() + b"}"
    response = service.client.post("/api/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text[:300]
    (reason,) = [plain_message(e) for e in response.json()["detail"]]
    assert "out of range: a ratio must be strictly between 0 and 1" in reason and len(reason) < 200, reason
    with pytest.raises(ValidationError, match="out of range"):
        JobSpec(model=MODEL, sparsity=number)


UNICODE = "must be valid Unicode text"


@pytest.mark.parametrize(
    "changes",
    [
        {"model": "/models/m\udc80"},
        {"revision": "main\udc80"},
        {"calibration": {"dataset": "/data/c\udcff.txt"}},
        {"evaluation": {"datasets": ["/data/e\ud800.txt"]}},
        {"layers": {"include": ["*.mlp\udc80"]}},
    ],
    ids=["model", "revision", "calibration", "evaluation", "glob"],
)
def test_a_lone_surrogate_is_refused_by_the_spec(changes):
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({"model": MODEL, "sparsity": 0.5, **changes})
    (error,) = info.value.errors()
    assert plain_message(error).startswith(UNICODE) and "\udc80" not in plain_message(error)
    assert error["loc"][0] == next(iter(changes))


def test_a_lone_surrogate_is_refused_the_same_through_the_form_and_the_cli(service):
    tail = ", which no UTF-8 text can hold"
    reason = f"{UNICODE}: character 10 is a lone surrogate (U+DCFF){tail}"
    assert form_reasons(form_fields(model="/models/m\udcff")) == [reason]
    assert form_reasons(form_fields(include="*.mlp.*, *.attn\udcff")) == [
        f"{UNICODE}: character 7 is a lone surrogate (U+DCFF){tail}"
    ]
    assert form_reasons(form_fields(sparsity="0.5\udcff"))[0].startswith("sparsity must be plain text")
    # A byte that is not UTF-8 on the command line becomes a lone surrogate in Python's argv.
    result = cli_process(b"/models/m\xff", "--sparsity", "0.5", "--no-eval")
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2 and stderr.count("error:") == 1 and f"MODEL: {reason}" in stderr, stderr[:500]
    # The API's JSON cannot carry one either: the edge refuses it before the spec (a 422, no job).
    before = service.client.get("/api/v1/jobs").json()["total"]
    response = service.client.post(
        "/api/v1/jobs",
        content=b'{"model": "/models/m\\udcff", "sparsity": 0.5}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422 and service.client.get("/api/v1/jobs").json()["total"] == before
