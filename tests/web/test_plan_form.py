"""The "New plan" form <-> the body of POST /api/v1/plans (app/web/plan_forms.py), without a
server: what the form sends becomes the body the API's own model (PlanIn) takes, and that
model's refusals land on the inputs that caused them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.plan_schemas import PlanIn
from app.web import plan_forms


def submitted(**changes) -> dict[str, list[str]]:
    """A form as a browser sends it (checkbox groups repeat their name; unchecked boxes are absent)."""
    fields = {
        "csrf_token": ["x" * 64],
        "name": ["  a plan  "],
        "model": ["/models/llama"],
        "dtype": ["float32"],
        "calibration_source": ["path"],
        "calibration_path": ["/data/calib.txt"],
        "nsamples": ["4"],
        "seqlen": ["32"],
        "seed": ["0"],
        "eval_extra": ["/data/eval.txt"],
        "max_windows": ["2"],
        "mode": ["grid"],
        "sparsities": ["0", "0.5", "2:4"],
        "sparsities_extra": ["0.7, 1:4"],
        "methods": ["sparsegpt", "wanda"],
        "quantization": ["none", "W4A16"],
        "quant_group_size": ["32"],
        "refit": ["off", "on"],
        "priority": ["low"],
        "budget_metric": ["perplexity"],
        "max_increase_pct": ["10"],
        "max_drop_points": ["2"],
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def test_a_grid_form_is_the_apis_body():
    values = plan_forms.values_of(submitted(quant_actorder=["1"]))
    assert plan_forms.choice_errors(values) == {}
    body = plan_forms.body_of(values)
    assert body["grid"] == {
        "sparsities": ["0", "0.5", "2:4", "0.7", "1:4"],
        "methods": ["sparsegpt", "wanda"],
        "quantization": [None, "W4A16"],
        "refit": [False, True],
    }
    assert body["calibration"] == {"dataset": "/data/calib.txt", "nsamples": 4, "seqlen": 32, "seed": 0}
    assert body["evaluation"] == {"datasets": ["/data/eval.txt"], "max_windows": 2}
    assert (body["group_size"], body["actorder"], body["priority"], body["name"]) == (32, True, "low", "a plan")
    assert "budget" not in body
    plan = PlanIn.model_validate(body)
    assert plan.grid.sparsities == ["0", "0.5", "2:4", "0.7", "1:4"] and plan.priority == "low"


def test_a_budget_form_and_no_quantization():
    values = plan_forms.values_of(submitted(mode=["budget"], quantization=["none"], refit=["off"]))
    body = plan_forms.body_of(values)
    assert "grid" not in body and "group_size" not in body  # no quantized setting: no group size sent
    assert body["budget"]["metric"] == "perplexity" and body["budget"]["max_increase_pct"] == 10
    assert "max_drop_points" not in body["budget"]
    assert PlanIn.model_validate(body).budget.as_json() == {"metric": "perplexity", "max_increase_pct": 10}

    values = plan_forms.values_of(submitted(mode=["budget"], budget_metric=["accuracy"], eval_tasks=["piqa"]))
    body = plan_forms.body_of(values)
    assert body["budget"]["max_drop_points"] == 2 and body["evaluation"]["tasks"] == ["piqa"]
    assert PlanIn.model_validate(body).budget.metric == "accuracy"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"sparsities": None, "sparsities_extra": [""]}, "sparsities"),
        ({"sparsities_extra": ["1.5"]}, "sparsities"),
        ({"methods": ["nope"]}, "methods"),
        ({"quantization": ["W3A16"]}, "quantization"),
        ({"nsamples": ["many"]}, "nsamples"),
        ({"quant_group_size": ["-7"]}, "quant_group_size"),
        ({"mode": ["budget"], "max_increase_pct": ["0"]}, "max_increase_pct"),
        ({"model": [""]}, "model"),
        ({"name": ["x" * 200]}, "name"),
    ],
)
def test_a_refusal_lands_on_its_input(changes, field):
    values = plan_forms.values_of(submitted(**changes))
    with pytest.raises(ValidationError) as err:
        PlanIn.model_validate(plan_forms.body_of(values))
    errors = plan_forms.field_errors(err.value.errors())
    assert field in errors, errors
    assert all(message and "Value error" not in message for message in errors[field])


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"calibration_source": ["file"]}, "calibration_source"),
        ({"calibration_source": ["upload"]}, "calibration_source"),
        ({"calibration_path": [""]}, "calibration_source"),
        ({"mode": ["both"]}, "mode"),
        ({"mode": ["budget"], "budget_metric": ["speed"]}, "budget_metric"),
        ({"priority": ["urgent"]}, "priority"),
    ],
)
def test_the_forms_own_choices_are_checked(changes, field):
    assert field in plan_forms.choice_errors(plan_forms.values_of(submitted(**changes)))


def test_the_defaults_are_a_valid_grid():
    values = {**plan_forms.DEFAULTS, "model": "/models/llama", "calibration_source": "path", "calibration_path": "/x"}
    values["eval_extra"] = "/data/eval.txt"
    assert plan_forms.choice_errors(values) == {}
    plan = PlanIn.model_validate(plan_forms.body_of(values))
    assert plan.grid.quantization == [None, "W4A16"] and plan.grid.refit == [False]
    assert all(plan_forms.HELP[name] for name in ("model", "methods", "sparsities", "quantization", "refit"))
