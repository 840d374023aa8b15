"""A small multiple-choice task in lm-evaluation-harness's YAML format over a local JSON-lines
file (no Hub), and the accuracy it measures computed directly from a model's log-likelihoods.

``choice_rows()`` makes the questions; ``write_choice_task(dir, rows)`` writes ``<name>.yaml`` and
its data there (a directory lm-eval's ``include_path`` / ``--eval-include`` takes);
``direct_picks(model, tokenizer, rows)`` is each question's answer by the summed log-probability of
each choice after the question (acc) and by that sum per character of the choice (acc_norm), as
the harness defines them, computed here with one plain forward per choice.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from tests.support.tiny_models import sample_text

TASK = "sparsegpt_tiny_choice"


def choice_rows(n: int = 24, seed: int = 0) -> list[dict]:
    """``n`` questions: a stretch of real text and four continuations (one of them the true one),
    each from a few words of the sample text; labels are set by the caller or left at 0."""
    words = sample_text(20_000).split()
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randrange(0, len(words) - 40)
        question = " ".join(words[start : start + 8])
        true = " ".join(words[start + 8 : start + 11])
        others = [" ".join(words[s : s + rng.randint(2, 4)]) for s in rng.sample(range(len(words) - 5), 3)]
        rows.append({"question": question, "choices": [true, *others], "label": 0})
    return rows


def write_choice_task(directory: Path, rows: list[dict], name: str = TASK) -> Path:
    """The task's YAML and data file in ``directory`` (the data's path is absolute: `datasets`
    reads it relative to the process's working directory otherwise)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "  - metric: acc_norm\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n",
        encoding="utf-8",
    )
    return directory


@torch.no_grad()
def choice_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context): the continuation's tokens are those the whole text has
    beyond the context's own tokens (how the harness splits a pair)."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    assert whole[: len(context_ids)] == context_ids, "the context's tokens change when the choice follows"
    ids = torch.tensor([whole])
    logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return float(sum(logprobs[t - 1, whole[t]] for t in range(len(context_ids), len(whole))))


def direct_picks(model, tokenizer, rows: list[dict]) -> tuple[list[int], list[int]]:
    """Per question, the choice with the highest log-likelihood (acc) and the highest per
    character of the choice (acc_norm); choices follow the question after one space."""
    model.eval()
    acc, norm = [], []
    for row in rows:
        lls = [choice_logprob(model, tokenizer, row["question"], " " + choice) for choice in row["choices"]]
        per_char = [ll / len(choice) for ll, choice in zip(lls, row["choices"])]
        acc.append(max(range(len(lls)), key=lambda i: (lls[i], -i)))  # ties: the first, as numpy's argmax
        norm.append(max(range(len(per_char)), key=lambda i: (per_char[i], -i)))
    return acc, norm


def accuracy(picks: list[int], rows: list[dict]) -> float:
    return sum(p == row["label"] for p, row in zip(picks, rows)) / len(rows)


def weigh_blocks(model, factor: float = 8.0) -> None:
    """Scale every Linear weight of the blocks by ``factor``, in place: a random model's answers
    come from its embeddings otherwise, and pruning its blocks would change none of them."""
    with torch.no_grad():
        for block in model.model.layers:
            for module in block.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.mul_(factor)


def rows_right_on(model, tokenizer, n: int = 32, right: int = 24) -> list[dict]:
    """``n`` questions labelled so the model picks the right choice on the first ``right`` and a
    wrong one on the rest: its accuracy is ``right / n`` by construction."""
    rows = choice_rows(n)
    picks, _ = direct_picks(model, tokenizer, rows)
    for i, (row, pick) in enumerate(zip(rows, picks)):
        row["label"] = pick if i < right else (pick + 1) % len(row["choices"])
    return rows
