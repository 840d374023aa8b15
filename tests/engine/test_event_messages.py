"""Progress events' messages (what the job page's event lines and SSE show): no path of the server
(the engine names a path as RunOptions.labels does; the worker's Redis reporter cuts any other
absolute path to its last part) and nothing the event's other fields already say."""

from __future__ import annotations

import pytest

from tests.support.tiny_models import make_tiny_model, sample_text
from worker.engine.contract.spec import JobSpec
from worker.engine.pipeline import RunOptions, run
from worker.engine.progress import plain_message
from worker.reporter import without_paths


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    """Every event of a run on server-like paths, with the worker's labels."""
    root = tmp_path_factory.mktemp("srv")
    model = make_tiny_model(root / "models" / "tiny")
    upload = root / "uploads" / "0a1b2c.txt"
    upload.parent.mkdir()
    upload.write_text(sample_text(20_000), encoding="utf-8")
    output = root / "jobs" / "attempt-1.partial"
    spec = JobSpec.model_validate(
        {
            "model": str(model),
            "sparsity": "2:4",
            "dtype": "float32",
            "calibration": {"dataset": str(upload), "nsamples": 4, "seqlen": 32},
            "evaluation": {"datasets": [str(upload)], "max_windows": 2},
        }
    )
    seen: list[dict] = []
    run(
        spec,
        RunOptions(device="cpu", output=str(output), labels={str(upload): "upload:3", str(output): "job-7"}),
        on_progress=seen.append,
    )
    return root, seen


def test_messages_name_paths_as_the_labels_do(events):
    root, seen = events
    messages = [e["message"] for e in seen]
    assert "sampling 4 windows of 32 tokens from upload:3" in messages and "to job-7" in messages
    # the model's path has no label here: the engine says it as given; the worker's reporter cuts it
    [loading] = [e for e in seen if e["stage"] == "loading" and e["message"]]
    assert without_paths(loading["message"]) == "tiny"
    assert all(str(root) not in without_paths(m) for m in messages)


def test_no_message_repeats_the_block_stage_or_module(events):
    _, seen = events
    for e in seen:
        message = e["message"]
        if e["layer"] is not None:
            assert f"block {e['layer'] + 1} of {e['layers']}" not in message, e
        assert not message.startswith(e["stage"] + " "), e
        if e["module"]:
            assert e["module"].rsplit(".", 2)[-2] + "." + e["module"].rsplit(".", 1)[-1] not in message, e
    pruning = [e for e in seen if e["stage"] == "pruning" and e["module"]]
    assert pruning and any(e["message"].startswith("with ") for e in pruning)  # q/k/v share a Hessian: the others
    lines = [(e["stage"], e["layer"], e["module"], e["message"]) for e in seen]
    assert all(a != b for a, b in zip(lines, lines[1:]) if a[3]), "two identical event lines in a row"


@pytest.mark.parametrize(
    "message,fields,expected",
    [
        (
            "pruning self_attn.q_proj, self_attn.k_proj",
            dict(stage="pruning", layer=0, layers=2, module="model.layers.0.self_attn.q_proj"),
            "with self_attn.k_proj",
        ),
        ("pruning mlp.down_proj", dict(stage="pruning", layer=1, layers=2, module="model.layers.1.mlp.down_proj"), ""),
        ("block 3 of 4", dict(stage="pruning", layer=2, layers=4, module=None), ""),
        ("dense block 3 of 4", dict(stage="evaluating", layer=2, layers=4, module=None), "dense"),
        (
            "OWL outlier ratios: block 1 of 4",
            dict(stage="pruning", layer=0, layers=4, module=None),
            "OWL outlier ratios",
        ),
        ("block 3 of 4", dict(stage="pruning", layer=1, layers=4, module=None), "block 3 of 4"),  # not this event's
        ("sparsegpt 2:4", dict(stage="pruning", layer=None, layers=None, module=None), "sparsegpt 2:4"),
    ],
)
def test_plain_message(message, fields, expected):
    assert plain_message(message, **fields) == expected
