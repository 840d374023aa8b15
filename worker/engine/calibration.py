"""Calibration and evaluation text, the reference's way.

Named sets come through ``datasets`` (c4, wikitext2, ptb); local .txt files are read whole
and .jsonl files are the ``text`` field of each line, joined with blank lines. Calibration
windows are sampled exactly as the reference does: ``random.seed(seed)``, then per sample
``i = random.randint(0, ntok - seqlen - 1)`` and ``ids[i : i + seqlen]``.
"""

from __future__ import annotations

import json
import os
import random
import re
from array import array
from pathlib import Path

import torch

from worker.engine.errors import DataError, InvalidJob

NAMED = ("c4", "wikitext2", "ptb")
C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"
# datasets >= 4 runs no loading scripts: ptb_text_only is read from the Hub's parquet export.
PTB_PARQUET = "hf://datasets/ptb-text-only/ptb_text_only@refs%2Fconvert%2Fparquet/penn_treebank/{split}/0000.parquet"


def is_named(name: str) -> bool:
    return name in NAMED


def _load_dataset(label: str, *args, **kwargs):
    import datasets  # imported on use: the CLI's argument checks should not pay for it

    check_hub(label)
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # network, hub or cache problems: say which set failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"could not load the {label} dataset: {first}") from exc


def check_hub(*names: str) -> None:
    """Fail at once, with what to do, when a built-in set is needed and the Hub cannot be reached
    (else a minute of hidden retries comes before the same failure)."""
    from worker.engine.contract import hub

    named = [n for n in names if is_named(n)]
    if not named or hub.offline() or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return
    why = hub.unreachable()
    if why is not None:
        raise DataError(hub.what_to_do("dataset", named[0], why))


def read_text_file(path: str | Path) -> str:
    """A .txt file whole, or the ``text`` fields of a .jsonl file joined with blank lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {str(path)!r} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name} is not UTF-8 text: {exc}") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name} line {lineno} is not JSON: {exc.msg}") from None
            except RecursionError:
                raise DataError(f"{path.name} line {lineno} is nested too deeply") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path.name} line {lineno} has no string field 'text'")
            texts.append(record["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise DataError(f"{path.name} holds no text")
    return raw


# Pieces of about this many characters are tokenised at a time: the tokenizer's BatchEncoding
# (offsets, token strings: ~600 bytes a token) then costs a few MB, and only the int32 ids of the
# whole text are kept (4 bytes a token).
PIECE_CHARS = 1 << 18
# Around each cut, this much text either side is tokenised whole and as two parts: a cut is taken
# only where both agree (the tokenizer's pre-tokenisation does not reach across it).
CHECK_CHARS = 512
_PARAGRAPH = re.compile(r"(?<=\S)\n\n")  # a cut before a blank line that follows text
_SPACE = re.compile(r"(?<=\S) (?=\S)")  # a cut before a single space between words


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (BOS, EOS), read from a probe."""
    bare, full = _ids(tokenizer, "a"), tokenizer("a").input_ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def _cut_is_exact(tokenizer, text: str, cut: int) -> bool:
    left, right = text[max(0, cut - CHECK_CHARS) : cut], text[cut : cut + CHECK_CHARS]
    return _ids(tokenizer, left + right) == _ids(tokenizer, left) + _ids(tokenizer, right)


def _next_cut(tokenizer, text: str, start: int) -> int:
    """Where the piece that begins at ``start`` ends: the first exact cut at a paragraph boundary
    past PIECE_CHARS, else (text without blank lines) the first exact cut before a space."""
    if len(text) - start <= PIECE_CHARS:
        return len(text)
    for pattern in (_PARAGRAPH, _SPACE):
        for match in pattern.finditer(text, start + PIECE_CHARS):
            if match.start() - start > 4 * PIECE_CHARS and pattern is _PARAGRAPH:
                break  # paragraphs this far apart: cut at a space instead
            if _cut_is_exact(tokenizer, text, match.start()):
                return match.start()
            if match.start() - start > 8 * PIECE_CHARS:
                break
    return len(text)  # no exact cut found: the rest in one piece


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    """All tokens of ``text`` as one 1-D int32 tensor (no truncation; the tokenizer's defaults), the
    same ids as ``tokenizer(text).input_ids``, tokenised piece by piece so that memory stays about
    4 bytes a token plus one piece's encoding (see ``_next_cut``), not ~600 bytes a token."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "longer than the maximum length" is expected here
    try:
        head, tail = _special_ends(tokenizer)
        ids = array("i", head)
        start = 0
        while start < len(text):
            cut = _next_cut(tokenizer, text, start)
            ids.extend(_ids(tokenizer, text[start:cut]))
            start = cut
        ids.extend(tail)
    finally:
        transformers.logging.set_verbosity(level)
    # the tensor shares the array's memory and keeps it alive (no copy of the ids)
    return torch.frombuffer(ids, dtype=torch.int32) if ids else torch.zeros(0, dtype=torch.int32)


def _sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str) -> torch.Tensor:
    if ids.numel() <= seqlen + 1:
        raise DataError(
            f"{source} has {ids.numel()} tokens, too few for windows of {seqlen}: use a longer text or a shorter seqlen"
        )
    random.seed(seed)
    rows = []
    for _ in range(nsamples):
        i = random.randint(0, ids.numel() - seqlen - 1)
        rows.append(ids[i : i + seqlen])
    return torch.stack(rows).long()  # (nsamples, seqlen)


def _c4_calibration(tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    data = _load_dataset("c4", "allenai/c4", data_files={"train": C4_TRAIN}, split="train")
    random.seed(seed)
    rows = []
    for _ in range(nsamples):
        for _attempt in range(10_000):  # documents longer than seqlen are common; guard anyway
            doc = data[random.randint(0, len(data) - 1)]["text"]
            ids = _tokenize(tokenizer, doc)
            if ids.numel() > seqlen:
                break
        else:
            raise DataError(f"c4: found no document longer than {seqlen} tokens")
        i = random.randint(0, ids.numel() - seqlen - 1)
        rows.append(ids[i : i + seqlen])
    return torch.stack(rows).long()


def _named_text(name: str, split: str) -> str:
    """The joined text of a named set's split, as the reference joins it."""
    if name == "wikitext2":
        rows = _load_dataset("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", split=split)["text"]
        return (" " if split == "train" else "\n\n").join(rows)
    if name == "ptb":
        rows = _load_dataset("ptb", "parquet", data_files={split: PTB_PARQUET.format(split=split)}, split=split)[
            "sentence"
        ]
        return " ".join(rows)
    if name == "c4":
        data = _load_dataset("c4", "allenai/c4", data_files={"validation": C4_VALIDATION}, split="validation")
        return " ".join(data[:1100]["text"])
    raise InvalidJob(f"unknown dataset {name!r}; use one of {', '.join(NAMED)} or a .txt/.jsonl file")


def calibration_windows(tokenizer, source: str, *, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) token ids from a named set or a local file."""
    if nsamples < 1:
        raise InvalidJob(f"nsamples must be at least 1, got {nsamples}")
    if source == "c4":
        return _c4_calibration(tokenizer, nsamples, seqlen, seed)
    text = _named_text(source, "train") if is_named(source) else read_text_file(source)
    return _sample_windows(_tokenize(tokenizer, text), nsamples, seqlen, seed, source)


def evaluation_windows(tokenizer, source: str, *, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seqlen from the start, the tail dropped: (windows, seqlen)."""
    text = (
        _named_text(source, "test" if source != "c4" else "validation") if is_named(source) else read_text_file(source)
    )
    ids = _tokenize(tokenizer, text)
    count = ids.numel() // seqlen
    if source == "c4":
        count = min(count, 256)  # the reference cuts c4 evaluation to 256 windows
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise DataError(f"{source} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: count * seqlen].reshape(count, seqlen).long()
