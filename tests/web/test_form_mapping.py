"""The new-job form's mapping to and from the job spec, without a server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.web.charts import line_chart
from app.web.forms import (
    FORM_DEFAULTS,
    HELP,
    OPTIONAL_SECTIONS,
    field_errors,
    form_from_spec,
    form_values,
    spec_body,
    split_list,
)
from app.web.pages import flatten
from worker.engine.contract.spec import JobSpec, get_path
from worker.engine.contract.spec_fields import leaf_fields


def test_defaults_are_the_specs_defaults():
    spec = JobSpec.model_validate(spec_body({**FORM_DEFAULTS, "model": "facebook/opt-125m"}))
    assert spec == JobSpec(model="facebook/opt-125m", sparsity=0.5)
    # Every optional field a person sets has an input that starts at the spec's default.
    dumped = JobSpec(model="org/name", sparsity=0.5).model_dump()
    for leaf in (leaf for leaf in leaf_fields() if leaf.ui.form and not leaf.required):
        default, shown = get_path(dumped, leaf.path), FORM_DEFAULTS[leaf.ui.form]
        if leaf.path[0] in OPTIONAL_SECTIONS:  # a section that is null by default (quantization): inputs empty
            assert default is None and shown in ("", False), leaf.dotted
        elif leaf.kind == "bool":
            assert shown is default, leaf.dotted
        elif leaf.kind == "list":
            assert split_list(shown) == default, leaf.dotted
        else:
            assert shown == ("" if default is None else str(default)), leaf.dotted


def test_empty_optional_inputs_take_the_specs_defaults():
    empty = {name: "" for name, value in FORM_DEFAULTS.items() if isinstance(value, str)}
    values = {**FORM_DEFAULTS, **empty, "model": "org/name", "sparsity": "2:4", "calibration_source": "c4"}
    assert JobSpec.model_validate(spec_body(values)) == JobSpec(model="org/name", sparsity="2:4")


@pytest.mark.parametrize(
    "spec",
    [
        {
            "model": "org/name",
            "revision": "v1",
            "method": "wanda",
            "sparsity": "4:8",
            "dtype": "bfloat16",
            "calibration": {"dataset": "upload:7", "nsamples": 16, "seqlen": 64, "seed": 3},
            "evaluation": {"datasets": ["ptb", "/data/eval.txt"], "max_windows": 5, "dense": False},
            "solver": {"blocksize": 64, "percdamp": 0.05},
        },
        {
            "model": "/models/llama",
            "sparsity": 0.6,
            "calibration": {"dataset": "/data/c.txt"},
            "evaluation": {"datasets": []},
            "solver": {"wbits": 4, "percdamp": 1e-5},
        },
        {"model": "org/name", "sparsity": "2:4", "solver": {"exact": True}},
        {
            "model": "org/name",
            "sparsity": 0.5,
            "layers": {
                "first_block": 2,
                "last_block": 9,
                "include": ["*.mlp.*", "*.self_attn.o_proj"],
                "exclude": ["*.mlp.down_proj"],
            },
        },
        {"model": "org/name", "sparsity": 0.7, "layers": {"last_block": 0, "exclude": ["model.layers.0.*"]}},
    ],
)
def test_clone_round_trip(spec):
    """A stored spec, put in the form (Clone) and submitted unchanged, is the same spec."""
    stored = JobSpec.model_validate(spec).model_dump(mode="json")
    again = JobSpec.model_validate(spec_body(form_from_spec(stored))).model_dump(mode="json")
    assert again == stored


QUANTIZED = [
    {"model": "org/name", "sparsity": 0.5, "quantization": {"scheme": "W4A16", "group_size": 32}},
    {"model": "org/name", "sparsity": 0, "quantization": {"scheme": "W8A16", "group_size": -1, "actorder": True}},
    {"model": "org/name", "sparsity": "2:4", "method": "wanda", "quantization": {"scheme": "FP8_DYNAMIC"}},
]


@pytest.mark.parametrize("spec", QUANTIZED)
def test_quantization_round_trips(spec):
    stored = JobSpec.model_validate(spec).model_dump(mode="json")
    form = form_from_spec(stored)
    assert form["quant_scheme"] == spec["quantization"]["scheme"]
    assert form["quant_group_size"] == str(stored["quantization"]["group_size"])
    assert form["quant_actorder"] is stored["quantization"]["actorder"]
    again = JobSpec.model_validate(spec_body(form)).model_dump(mode="json")
    assert again == stored


def test_the_quantization_inputs():
    # none chosen: no quantization (the empty select), whatever the empty group size says
    base = {**FORM_DEFAULTS, "model": "org/name"}
    assert JobSpec.model_validate(spec_body(base)).quantization is None
    # a scheme with the group size left empty takes the scheme's own: 128, FP8_DYNAMIC per channel
    assert JobSpec.model_validate(spec_body({**base, "quant_scheme": "W4A16"})).quantization.group_size == 128
    assert JobSpec.model_validate(spec_body({**base, "quant_scheme": "FP8_DYNAMIC"})).quantization.group_size == -1
    # posted fields as the browser sends them: the checkbox on by its name
    values = form_values(
        {
            "model": ["org/name"],
            "quant_scheme": ["W4A16"],
            "quant_group_size": [" 64 "],
            "quant_actorder": ["1"],
            "calibration_source": ["c4"],
        }
    )
    assert (values["quant_scheme"], values["quant_group_size"], values["quant_actorder"]) == ("W4A16", "64", True)
    # the help under each input is the spec's own description of the field
    q = JobSpec.model_fields["quantization"].annotation
    section = next(a for a in getattr(q, "__args__", (q,)) if a is not type(None))
    for name, field in (("quant_scheme", "scheme"), ("quant_group_size", "group_size"), ("quant_actorder", "actorder")):
        description = section.model_fields[field].description  # as a sentence: its first letter capitalised
        assert HELP[name] == description[:1].upper() + description[1:] and HELP[name]


@pytest.mark.parametrize(
    ("quantization", "extra", "field", "words"),
    [
        ({"scheme": "FP8_DYNAMIC", "group_size": 128}, {}, "quant_group_size", "FP8_DYNAMIC has one scale per output"),
        ({"scheme": "W3A16"}, {}, "quant_scheme", "W4A16"),
        ({"group_size": 64}, {}, "quant_scheme", "quantization.scheme is required"),
        ({"scheme": "W4A16", "group_size": 0}, {}, "quant_group_size", "positive number of input columns"),
        ({"scheme": "W4A16", "actorder": True}, {"method": "wanda"}, "quant_actorder", "sparsegpt only"),
    ],
)
def test_quantization_errors_sit_by_their_input(quantization, extra, field, words):
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate({"model": "org/name", "sparsity": 0.5, "quantization": quantization, **extra})
    shown = field_errors(caught.value.errors())
    assert list(shown) == [field] and words in shown[field][0], shown


def test_clone_of_a_spec_stored_before_layers_existed():
    form = form_from_spec({"model": "org/name", "method": "wanda", "sparsity": "2:4"})
    assert (form["first_block"], form["include"], form["method"]) == ("", "", "wanda")


def test_posted_fields_to_the_spec():
    """What a browser posts (checkboxes only when ticked, lists as text) -> the nested body."""
    fields = {
        "model": [" org/name "],
        "sparsity": ["2:4"],
        "calibration_source": ["path"],
        "calibration_path": ["/data/c.txt"],
        "eval_sets": ["c4", "ptb"],
        "eval_extra": ["upload:3,\n/data/e.txt"],
        "exact": ["1"],
        "first_block": ["1"],
        "include": ["*.mlp.*,\n*.self_attn.*,"],
        "exclude": [" "],
    }
    spec = JobSpec.model_validate(spec_body(form_values(fields)))
    assert spec.model == "org/name" and spec.calibration.dataset == "/data/c.txt"
    assert spec.evaluation.datasets == ["c4", "ptb", "upload:3", "/data/e.txt"]
    assert spec.solver.exact and not spec.evaluation.dense and not spec.trust_remote_code  # unticked: absent
    assert (spec.layers.first_block, spec.layers.last_block) == (1, None)
    assert spec.layers.include == ["*.mlp.*", "*.self_attn.*"] and spec.layers.exclude == []


def errors_for(**changes) -> dict[str, list[str]]:
    values = {**FORM_DEFAULTS, "model": "org/name", **changes}
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(spec_body(values))
    return field_errors(info.value.errors())


def test_errors_land_on_their_fields():
    assert errors_for(sparsity="3:2", nsamples="0") == {
        "sparsity": ["sparsity pattern '3:2': N:M needs 0 < N < M (for example 2:4 or 4:8)"],
        "nsamples": ["Must be at least 1 (got 0)"],
    }
    assert set(errors_for(seqlen="4", blocksize="x", percdamp="2", seed="-1", max_windows="0")) == {
        "seqlen",
        "blocksize",
        "percdamp",
        "seed",
        "max_windows",
    }
    assert set(errors_for(calibration_source="path", calibration_path="relative.txt")) == {"calibration_source"}
    assert set(errors_for(eval_extra="nonsense")) == {"eval_sets"}
    assert set(errors_for(model="../etc")) == {"model"}
    assert set(errors_for(model="")) == {"model"}
    # Checks across fields go to the field they name.
    assert set(errors_for(method="wanda", wbits="4")) == {"wbits"}
    assert set(errors_for(method="magnitude", exact=True)) == {"exact"}
    assert set(errors_for(sparsity="2:4", blocksize="6")) == {"blocksize"}


def test_layer_errors_land_on_their_fields():
    assert errors_for(first_block="-1") == {"first_block": ["Must be at least 0 (got -1)"]}
    assert errors_for(last_block="two") == {"last_block": ["Must be a whole number (got two)"]}
    reversed_range = errors_for(first_block="5", last_block="2")
    assert list(reversed_range) == ["first_block"]
    assert "is after layers.last_block 2" in reversed_range["first_block"][0]
    empty_pattern = errors_for(include="*.mlp.*,,*.self_attn.*")
    assert list(empty_pattern) == ["include"] and "is not a module name pattern" in empty_pattern["include"][0]
    assert set(errors_for(exclude="*.mlp.*, ,*.o_proj")) == {"exclude"}
    assert set(errors_for(include=", ".join(["*.mlp.*"] * 40))) == {"include"}


def test_flatten_and_chart_escape_what_they_show():
    assert flatten({"a": {"b": None, "c": [1, 2]}, "d": []}) == {"a.b": "–", "a.c": "1, 2", "d": "(none)"}
    svg = str(line_chart([("<script>", [(0, 0.1), (1, 0.2)]), ("empty", [])], title="t & u", x_label="block"))
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "t &amp; u" in svg
    assert svg.count("<polyline") == 1 and "empty (none)" in svg
