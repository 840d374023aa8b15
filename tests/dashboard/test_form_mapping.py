"""The new-job form's mapping to and from the job spec, without a server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.dashboard import FORM_DEFAULTS, field_errors, flatten, form_from_spec, line_chart, spec_body
from app.schemas import JobSpec


def test_defaults_are_the_specs_defaults():
    spec = JobSpec.model_validate(spec_body({**FORM_DEFAULTS, "model": "facebook/opt-125m"}))
    assert spec == JobSpec(model="facebook/opt-125m", sparsity=0.5)


@pytest.mark.parametrize("spec", [
    {"model": "org/name", "revision": "v1", "method": "wanda", "sparsity": "4:8", "dtype": "bfloat16",
     "calibration": {"dataset": "upload:7", "nsamples": 16, "seqlen": 64, "seed": 3},
     "evaluation": {"datasets": ["ptb", "/data/eval.txt"], "max_windows": 5, "dense": False},
     "solver": {"blocksize": 64, "percdamp": 0.05}},
    {"model": "/models/llama", "sparsity": 0.6, "calibration": {"dataset": "/data/c.txt"},
     "evaluation": {"datasets": []}, "solver": {"wbits": 4}},
    {"model": "org/name", "sparsity": "2:4", "solver": {"exact": True}},
])
def test_clone_round_trip(spec):
    """A stored spec, put in the form (Clone) and submitted unchanged, is the same spec."""
    stored = JobSpec.model_validate(spec).model_dump(mode="json")
    again = JobSpec.model_validate(spec_body(form_from_spec(stored))).model_dump(mode="json")
    assert again == stored


def errors_for(**changes) -> dict[str, list[str]]:
    values = {**FORM_DEFAULTS, "model": "org/name", **changes}
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(spec_body(values))
    return field_errors(info.value.errors())


def test_errors_land_on_their_fields():
    assert errors_for(sparsity="3:2", nsamples="0") == {
        "sparsity": ["pattern '3:2': N:M needs 0 < N < M (for example 2:4 or 4:8)"],
        "nsamples": ["Must be at least 1 (got 0)"],
    }
    assert set(errors_for(seqlen="4", blocksize="x", percdamp="2", seed="-1", max_windows="0")) == {
        "seqlen", "blocksize", "percdamp", "seed", "max_windows"}
    assert set(errors_for(calibration_source="path", calibration_path="relative.txt")) == {"calibration_source"}
    assert set(errors_for(eval_extra="nonsense")) == {"eval_sets"}
    assert set(errors_for(model="../etc")) == {"model"}
    # Checks across fields go to the field they name.
    assert set(errors_for(method="wanda", wbits="4")) == {"wbits"}
    assert set(errors_for(method="magnitude", exact=True)) == {"exact"}
    assert set(errors_for(sparsity="2:4", blocksize="6")) == {"blocksize"}


def test_flatten_and_chart_escape_what_they_show():
    assert flatten({"a": {"b": None, "c": [1, 2]}, "d": []}) == {"a.b": "–", "a.c": "1, 2", "d": "(none)"}
    svg = str(line_chart([("<script>", [(0, 0.1), (1, 0.2)]), ("empty", [])], title="t & u", x_label="block"))
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "t &amp; u" in svg
    assert svg.count("<polyline") == 1 and "empty (none)" in svg
