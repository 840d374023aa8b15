"""The ETA comes from measured times: the current stage's pace per block, a later evaluation as
long as the dense one took. A job whose pruning is slower than the stage weights assume (the
issue's "1m33s at 25% when ~6 minutes remained") gets an ETA near the time really left."""

from __future__ import annotations

import time

import pytest

from worker.engine.progress import Tracker

STAGES = ["loading", "calibrating", "evaluating_dense", "pruning", "evaluating", "saving"]
BLOCKS = 4
EVAL_BLOCK_S, PRUNE_BLOCK_S = 0.03, 0.4  # pruning ~13x an evaluation block, as on real models


def run_job(events: list[tuple[float, dict]]) -> float:
    """A job's stages, block by block, with real time passing; returns when it ended."""
    tracker = Tracker(lambda e: events.append((time.perf_counter(), e)), None, STAGES)
    tracker.begin("loading")
    time.sleep(0.05)
    tracker.begin("calibrating")
    time.sleep(0.02)
    for stage, per_block in (
        ("evaluating_dense", EVAL_BLOCK_S),
        ("pruning", PRUNE_BLOCK_S),
        ("evaluating", EVAL_BLOCK_S),
    ):
        tracker.begin(stage)
        for i in range(BLOCKS):
            tracker.emit(i / BLOCKS, layer=i, layers=BLOCKS)
            time.sleep(per_block)
        tracker.emit(1.0, layer=BLOCKS - 1, layers=BLOCKS)
    tracker.begin("saving")
    time.sleep(0.02)
    tracker.emit(1.0, message="done")
    return time.perf_counter()


def test_eta_follows_the_measured_block_times():
    events: list[tuple[float, dict]] = []
    end = run_job(events)
    pruning = [(t, e) for t, e in events if e["stage"] == "pruning" and e["layer"] is not None]
    assert pruning[0][1]["eta_s"] is None  # nothing measured in this stage yet: no guess
    checked = 0
    for t, e in pruning[1:]:  # after 1, 2, 3 blocks (and at the end of the stage)
        left = end - t
        assert e["eta_s"] == pytest.approx(left, rel=0.25, abs=0.1), (e, left)
        checked += 1
    assert checked == BLOCKS
    # The weights alone would have said: elapsed * (1 - fraction) / fraction; after the first
    # pruned block that is far below what was left (the case).
    t, e = pruning[1]
    weights_guess = e["elapsed_s"] * (1 - e["fraction"]) / e["fraction"]
    assert weights_guess < 0.8 * (end - t) and abs(e["eta_s"] - (end - t)) < abs(weights_guess - (end - t)) / 2
    # The pruned evaluation is estimated as long as the dense one took.
    t, e = next((t, e) for t, e in events if e["stage"] == "evaluating" and e["layer"] == 1 and t > pruning[-1][0])
    assert e["eta_s"] == pytest.approx(end - t, rel=0.35, abs=0.1)
