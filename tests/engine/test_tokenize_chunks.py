"""Issue 22 item 6: calibration and evaluation text is tokenised piece by piece, to the same ids as
tokenising it whole, with memory that does not grow by the tokenizer's ~600 bytes a token."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import processors

from tests.support.tiny_models import make_tokenizer
from worker.engine import calibration
from worker.engine.calibration import _tokenize, evaluation_windows

REPO = Path(__file__).resolve().parents[2]
EVAL_TXT = REPO.parent / "shared" / "data" / "protocol-p" / "eval.txt"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def eval_text():
    if not EVAL_TXT.is_file():
        pytest.skip(f"{EVAL_TXT} is not here")
    return EVAL_TXT.read_text(encoding="utf-8")


@pytest.mark.parametrize("piece_chars", [2_000, 50_000])
def test_pieces_give_the_ids_of_the_whole_text(tokenizer, eval_text, monkeypatch, piece_chars):
    monkeypatch.setattr(calibration, "PIECE_CHARS", piece_chars)
    whole = tokenizer(eval_text).input_ids
    got = _tokenize(tokenizer, eval_text)
    assert got.dtype == torch.int32
    assert got.tolist() == whole


def test_text_without_paragraphs_is_cut_between_words(tokenizer, eval_text, monkeypatch):
    """wikitext2 train and ptb are joined with single spaces: no blank line to cut at."""
    monkeypatch.setattr(calibration, "PIECE_CHARS", 3_000)
    text = " ".join(eval_text[:200_000].split())
    assert "\n" not in text
    assert _tokenize(tokenizer, text).tolist() == tokenizer(text).input_ids


def test_special_tokens_come_once_around_the_whole_text(eval_text, monkeypatch):
    """A tokenizer that adds BOS and EOS (as Llama's adds BOS) gets them once, not per piece."""
    tok = make_tokenizer()
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
    )
    monkeypatch.setattr(calibration, "PIECE_CHARS", 20_000)
    text = eval_text[:300_000]
    whole = tok(text).input_ids
    assert whole[0] == eos and whole[-1] == eos
    assert _tokenize(tok, text).tolist() == whole


def test_evaluation_windows_match_whole_tokenisation(tokenizer, eval_text, tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "PIECE_CHARS", 10_000)
    (tmp_path / "eval.txt").write_text(eval_text, encoding="utf-8")
    ids = tokenizer(eval_text).input_ids
    windows = evaluation_windows(tokenizer, str(tmp_path / "eval.txt"), seqlen=128)
    assert windows.dtype == torch.long
    assert windows.shape == (len(ids) // 128, 128)
    assert torch.equal(windows.flatten(), torch.tensor(ids[: windows.numel()]))


PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {repo!r})
    from tests.support.tiny_models import make_tokenizer
    from worker.engine.calibration import _tokenize
    tok = make_tokenizer()
    text = "\\n\\n".join([open({eval_txt!r}, encoding="utf-8").read()] * {copies})
    _tokenize(tok, "warm up\\n\\nthe tokenizer")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ids = _tokenize(tok, text)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(len(text), ids.numel(), (after - before) * 1024)
""")


def test_peak_memory_of_a_large_text_stays_bounded(eval_text):
    """About 10 MB of text (6M tokens): tokenised whole, the BatchEncoding alone took ~2 GB (the
    old code: 527 MiB of peak growth for 2.6 MB); in pieces the growth is the int32 ids plus one
    piece's encoding. Measured as the growth of peak RSS in a fresh interpreter."""
    script = PEAK_SCRIPT.format(repo=str(REPO), eval_txt=str(EVAL_TXT), copies=8)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    chars, tokens, growth = (int(x) for x in out.stdout.split())
    assert chars > 10_000_000 and tokens > 5_000_000
    assert growth < 200 * 2**20 + 8 * tokens, f"peak RSS grew by {growth / 2**20:.0f} MiB for {tokens} tokens"
