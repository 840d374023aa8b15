"""A plan's points and view against hand-computed cases: the grid's expansion (duplicates, the dense
point, refit at sparsity 0), the budget's order by size and its skip rule, each point's figures
against the dense model's, the Pareto front, the recommendation (budget and grid), retries followed,
the CSV (no formula injection). Pure functions: transient ORM rows, no database."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from app.models import Artifact, Job
from app.plan_schemas import PlanIn
from app.services import plan_points
from app.services.plan_view import pareto_keys, table_csv, view

DENSE_PPL = 20.0
DENSE_BYTES = 1000


def body(**changes) -> PlanIn:
    data = {"model": "org/model", "grid": {"sparsities": ["0", "0.5", "2:4"], "quantization": [None, "W4A16"]}}
    data.update(changes)
    return PlanIn.model_validate(data)


def test_grid_expansion_drops_duplicates_and_keeps_one_dense_point():
    points = plan_points.expand(
        body(
            grid={
                "sparsities": ["0", "50%", "0.5", "2:4", "0.0"],
                "methods": ["sparsegpt", "wanda"],
                "quantization": ["none", None, "W4A16"],
                "refit": [False, True],
            }
        )
    )
    keys = [p["key"] for p in points]
    assert keys[0] == "dense" and keys.count("dense") == 1 and points[0]["state"] == "dense"
    assert len(keys) == len(set(keys))
    # refit at sparsity 0 is the same job as without: dropped; quantization-only points stay
    assert "sparsegpt-0-W4A16" in keys and "sparsegpt-0-W4A16-refit" not in keys
    assert "wanda-0.5-none-refit" in keys and "sparsegpt-2:4-W4A16-refit" in keys
    # 1 dense + sparsity 0: 2 methods x W4A16 + (0.5, 2:4) x 2 methods x 2 schemes x 2 refit
    assert len(points) == 1 + 2 + 2 * 2 * 2 * 2
    assert all(p["state"] == "pending" for p in points[1:])


def test_budget_order_is_by_size_bits_then_sparsity():
    plan = body(
        grid=None,
        budget={
            "metric": "perplexity",
            "max_increase_pct": 5,
            "sparsities": ["2:4", "0.5", "0", "0.3"],
            "quantization": ["W4A16", None, "W8A16"],
        },
    )
    keys = [p["key"] for p in plan_points.expand(plan)]
    assert keys == [
        "dense",
        "sparsegpt-0.3-none",
        "sparsegpt-0.5-none",
        "sparsegpt-2:4-none",
        "sparsegpt-0-W8A16",
        "sparsegpt-0.3-W8A16",
        "sparsegpt-0.5-W8A16",
        "sparsegpt-2:4-W8A16",
        "sparsegpt-0-W4A16",
        "sparsegpt-0.3-W4A16",
        "sparsegpt-0.5-W4A16",
        "sparsegpt-2:4-W4A16",
    ]


def test_a_miss_skips_what_is_at_least_as_compressed_in_the_same_method_and_refit():
    plan = body(
        grid=None,
        budget={
            "metric": "perplexity",
            "max_increase_pct": 5,
            "sparsities": ["0", "0.3", "0.5", "0.7"],
            "methods": ["sparsegpt", "wanda"],
            "quantization": [None, "W8A16", "W4A16"],
        },
    )
    points = plan_points.expand(plan)
    missed = next(p for p in points if p["key"] == "sparsegpt-0.5-W8A16")
    skipped = set(plan_points.skip_after_miss(points, missed, "auto"))
    expected = {f"sparsegpt-{s}-{q}" for s in ("0.5", "0.7") for q in ("W8A16", "W4A16")}
    assert skipped == expected
    for point in points:
        if point["key"] in expected:
            assert point["state"] == "skipped" and "sparsegpt-0.5-W8A16" in point["reason"]
        elif point["key"] != "dense":
            assert point["state"] == "pending", point["key"]  # wanda, fewer bits-or-sparsity: untouched


@pytest.mark.parametrize(
    "change, message",
    [
        ({"grid": None}, "either grid"),
        ({"budget": {"metric": "perplexity", "sparsities": ["0.5"]}}, "max_increase_pct"),
        ({"grid": {"sparsities": ["0.5"], "methods": ["nope"]}}, "methods"),
        ({"grid": {"sparsities": ["1.5"]}}, "out of range"),
        ({"grid": {"sparsities": [str(i / 10) for i in range(1, 10)]}}, "at most 8"),
        ({"evaluation": {"datasets": []}}, "compares quality"),
        ({"solver": {"refit": "reconstruct"}}, "refit"),
        ({"wbits": 4}, "wbits"),
    ],
)
def test_bad_bodies_are_refused(change, message):
    with pytest.raises(ValidationError) as err:
        body(**change)
    assert message in str(err.value)


def test_job_spec_of_a_point():
    plan = body(group_size=64, actorder=True, solver={"blocksize": 64})
    base = plan_points.base_spec(plan)
    point = {"key": "k", "method": "sparsegpt", "sparsity": "0.5", "quantization": "W4A16", "refit": False}
    spec = plan_points.job_spec(base, point, dense=False)
    assert spec["quantization"] == {"scheme": "W4A16", "group_size": 64, "actorder": True}
    assert (
        spec["solver"] == {"blocksize": 64, "percdamp": 0.01, "refit": "none"} and spec["evaluation"]["dense"] is False
    )
    refit = plan_points.job_spec(base, {**point, "quantization": None, "refit": True}, dense=True)
    assert refit["quantization"] is None and refit["solver"]["refit"] == "reconstruct"
    assert refit["evaluation"]["dense"] is True and "group_size" not in refit


# --- the view ------------------------------------------------------------------------------------


def point(key, sparsity="0.5", quantization=None, state="job", job_id=None, method="sparsegpt"):
    return dict(
        key=key, method=method, sparsity=sparsity, quantization=quantization, refit=False, state=state,
        job_id=job_id, reason=None,
    )  # fmt: skip


def job(job_id, ppl, size, *, quantized=False, dense=False, status="succeeded", retry_of=None, acc=None):
    result = {"perplexity": {"wiki": ppl}}
    if dense:
        result["dense_perplexity"] = {"wiki": DENSE_PPL}
    if acc is not None:
        result["zero_shot"] = {"pruned": {"piqa": {"acc": acc, "acc_stderr": 0.01}}}
        if dense:
            result["zero_shot"]["dense"] = {"piqa": {"acc": 0.70}}
    spec = {"quantization": {"scheme": "W4A16"} if quantized else None, "evaluation": {"dense": dense}}
    row = Job(id=job_id, status=status, spec=spec, result=result if status == "succeeded" else None, retry_of=retry_of)
    if status == "succeeded":
        row.artifact_size, row.artifact_sha256 = size, "ab" * 32
        if quantized:
            row.artifacts.append(Artifact(format="dense", size=DENSE_BYTES, path="x", media_type="x", sha256="x"))
    return row


def plan_of(points, budget=None, datasets=("wiki",)):
    return SimpleNamespace(
        id=7, name="p", owner=None, model="m", mode="budget" if budget else "grid", budget=budget,
        priority="normal", status="succeeded", created_at=datetime(2026, 12, 7, tzinfo=timezone.utc),
        finished_at=None, base={"evaluation": {"datasets": list(datasets)}, "dtype": "auto"}, points=points,
    )  # fmt: skip


POINTS = [
    point("dense", sparsity="0", state="dense"),
    point("s50", job_id=1),  # dense bytes (zeros stored), ppl 21: dominated by the dense model
    point("s50q", quantization="W4A16", job_id=2),  # 300 bytes, ppl 21.5: +7.5%
    point("s24q", sparsity="2:4", quantization="W4A16", job_id=3),  # 300 bytes, ppl 25: dominated by s50q
    point("s0q", sparsity="0", quantization="W8A16", job_id=4),  # 500 bytes, ppl 20.2: +1%
    point("s70q", sparsity="0.7", quantization="W4A16", job_id=5),  # 280 bytes, ppl 30: +50%
    point("late", job_id=None, state="pending"),
]
JOBS = [
    job(1, 21.0, DENSE_BYTES, dense=True),
    job(2, 21.5, 300, quantized=True),
    job(3, 25.0, 300, quantized=True),
    job(4, 20.2, 500, quantized=True),
    job(5, 30.0, 280, quantized=True),
]


def test_grid_view_figures_pareto_and_recommendation():
    data = view(plan_of(POINTS), JOBS)
    rows = {r["key"]: r for r in data["points"]}
    assert data["dense"]["perplexity"] == {"wiki": DENSE_PPL} and data["dense"]["bytes"] == DENSE_BYTES
    assert data["dense"]["job_id"] == 1 and data["metric"] == "perplexity" and data["dataset"] == "wiki"
    assert rows["dense"]["perplexity"] == DENSE_PPL and rows["dense"]["bytes"] == DENSE_BYTES
    assert rows["s50q"]["quality_change_pct"] == pytest.approx(7.5)
    assert rows["s50q"]["ratio"] == pytest.approx(0.3) and rows["s50q"]["format"] == "compressed-tensors"
    assert rows["s50"]["format"] == "hf-tar" and rows["s50"]["ratio"] == pytest.approx(1.0)
    # Pareto by hand: dense (1000, 20) ; s0q (500, 20.2) ; s50q (300, 21.5) ; s70q (280, 30)
    assert {k for k, r in rows.items() if r["pareto"]} == {"dense", "s0q", "s50q", "s70q"}
    # no budget: the smallest Pareto point within +10%: s50q (s70q is +50%)
    assert data["recommended"] == {"key": "s50q", "job_id": 2, "download_url": "/api/v1/jobs/2/artifact"}
    assert rows["s50q"]["recommended"] and sum(r["recommended"] for r in rows.values()) == 1
    assert "no budget was set" in data["recommendation_reason"] and "+10%" in data["recommendation_reason"]
    assert all(r["meets_budget"] is None for r in rows.values())
    assert data["counts"] == {
        "pending": 1, "queued": 0, "running": 0, "succeeded": 5, "failed": 0, "cancelled": 0, "skipped": 0
    }  # fmt: skip
    assert rows["late"]["status"] == "pending" and rows["late"]["job_url"] is None


def test_budget_recommends_the_smallest_that_meets_it():
    data = view(plan_of(POINTS, budget={"metric": "perplexity", "max_increase_pct": 2}), JOBS)
    rows = {r["key"]: r for r in data["points"]}
    assert {k: r["meets_budget"] for k, r in rows.items() if r["state"] == "job"} == {
        "s50": False, "s50q": False, "s24q": False, "s0q": True, "s70q": False
    }  # fmt: skip
    assert data["recommended"]["key"] == "s0q"
    assert data["recommendation_reason"] == "the smallest artifact whose perplexity is at most +2% of the dense model's"
    loose = view(plan_of(POINTS, budget={"metric": "perplexity", "max_increase_pct": 60}), JOBS)
    assert loose["recommended"]["key"] == "s70q"  # 280 bytes: the smallest within +60%
    none = view(plan_of(POINTS, budget={"metric": "perplexity", "max_increase_pct": 0.5}), JOBS)
    assert none["recommended"] is None and not any(r["recommended"] for r in none["points"])


def test_ties_in_bytes_go_to_the_better_quality_and_accuracy_is_higher_is_better():
    points = [point("dense", sparsity="0", state="dense"), point("a", job_id=1), point("b", job_id=2)]
    jobs = [job(1, 25.0, 300, quantized=True, dense=True, acc=0.69), job(2, 22.0, 300, quantized=True, acc=0.60)]
    data = view(plan_of(points, budget={"metric": "perplexity", "max_increase_pct": 30}), jobs)
    assert data["recommended"]["key"] == "b"  # same bytes, lower perplexity
    acc = view(plan_of(points, budget={"metric": "accuracy", "max_drop_points": 5}), jobs)
    rows = {r["key"]: r for r in acc["points"]}
    assert acc["metric"] == "accuracy" and acc["dense"]["mean_accuracy"] == pytest.approx(0.70)
    assert rows["a"]["accuracy_drop_points"] == pytest.approx(1.0) and rows["b"][
        "accuracy_drop_points"
    ] == pytest.approx(10.0)
    assert rows["a"]["meets_budget"] is True and rows["b"]["meets_budget"] is False
    assert acc["recommended"]["key"] == "a"
    assert pareto_keys(acc["points"], "accuracy") == {"a", "dense"}  # b: same bytes as a, lower accuracy


def test_a_retried_job_is_followed_and_failed_ones_have_no_figures():
    points = [point("dense", sparsity="0", state="dense"), point("a", job_id=1), point("b", job_id=2)]
    jobs = [
        job(1, 0, 0, status="failed"),
        job(2, 22.0, 300, quantized=True, dense=True),
        job(3, 0, 0, status="failed", retry_of=1),
        job(4, 21.0, 350, quantized=True, retry_of=3),
    ]
    data = view(plan_of(points), jobs)
    rows = {r["key"]: r for r in data["points"]}
    assert rows["a"]["job_id"] == 4 and rows["a"]["status"] == "succeeded" and rows["a"]["perplexity"] == 21.0
    failed = view(plan_of(points), jobs[:3])
    row = next(r for r in failed["points"] if r["key"] == "a")
    assert row["job_id"] == 3 and row["status"] == "failed" and row["perplexity"] is None and row["bytes"] is None
    assert failed["counts"]["failed"] == 1 and failed["counts"]["succeeded"] == 1


def test_csv_has_a_header_a_row_per_point_and_no_formulas():
    points = [*POINTS[:3], {**point("=cmd|' /C calc'!A0", job_id=None, state="skipped"), "reason": "@SUM(A1)"}]
    data = view(plan_of(points), JOBS)
    rows = list(csv.reader(io.StringIO(table_csv(data))))
    assert rows[0][:3] == ["key", "method", "sparsity"] and len(rows) == 1 + len(points)
    header = rows[0]
    evil = dict(zip(header, rows[-1]))
    assert evil["key"].startswith("'=") and evil["reason"] == "'@SUM(A1)"
    s50q = dict(zip(header, rows[3]))
    assert float(s50q["perplexity"]) == 21.5 and s50q["quality_change_pct"] == "7.5" and s50q["pareto"] == "true"
    negative = view(
        plan_of([point("dense", sparsity="0", state="dense"), point("x", job_id=2)]),
        [job(2, 19.0, 300, dense=True, quantized=True)],
    )
    row = dict(zip(header, list(csv.reader(io.StringIO(table_csv(negative))))[2]))
    assert row["quality_change_pct"] == "-5"  # a number stays a number
