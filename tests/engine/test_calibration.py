"""Calibration windows are sampled exactly as the reference samples them."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.support.tiny_models import make_tokenizer, sample_text
from worker.engine.calibration import calibration_windows, evaluation_windows, read_text_file
from worker.engine.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_windows_follow_the_reference_sampling(tokenizer, tmp_path):
    text = sample_text()
    (tmp_path / "cal.txt").write_text(text, encoding="utf-8")
    got = calibration_windows(tokenizer, str(tmp_path / "cal.txt"), nsamples=5, seqlen=32, seed=3)
    ids = tokenizer(text).input_ids
    random.seed(3)
    expected = []
    for _ in range(5):
        i = random.randint(0, len(ids) - 32 - 1)
        expected.append(ids[i : i + 32])
    assert torch.equal(got, torch.tensor(expected))


def test_jsonl_uses_the_text_field(tokenizer, tmp_path):
    docs = ["first document " * 20, "second document " * 20]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    assert read_text_file(tmp_path / "c.jsonl") == "\n\n".join(docs)
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match="no string field 'text'"):
        read_text_file(tmp_path / "bad.jsonl")


def test_evaluation_windows_drop_the_tail(tokenizer, tmp_path):
    (tmp_path / "e.txt").write_text(sample_text(), encoding="utf-8")
    ids = tokenizer(sample_text()).input_ids
    windows = evaluation_windows(tokenizer, str(tmp_path / "e.txt"), seqlen=100)
    assert windows.shape == (len(ids) // 100, 100)
    assert torch.equal(windows[1], torch.tensor(ids[100:200]))
    assert evaluation_windows(tokenizer, str(tmp_path / "e.txt"), seqlen=100, max_windows=3).shape[0] == 3


def test_too_short_text_is_a_clear_error(tokenizer, tmp_path):
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(DataError, match="too few for windows of 512"):
        calibration_windows(tokenizer, str(tmp_path / "short.txt"), nsamples=2, seqlen=512, seed=0)


def test_deeply_nested_jsonl_line_is_a_data_error(tmp_path):
    """A file named by path is not checked at upload: a line nested past Python's recursion
    limit is a DataError naming the line, not a RecursionError."""
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + "[" * 200_000 + "]" * 200_000 + "\n")
    with pytest.raises(DataError, match="line 2 is nested too deeply"):
        read_text_file(path)
