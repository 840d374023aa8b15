"""A local zero-shot task for protocol P (no Hub): which of four 5-word continuations follows a
passage of WikiText-2's test text (../shared/data/protocol-p/eval.txt), the three others taken
from elsewhere in it. It is written in lm-evaluation-harness's YAML format over a JSON-lines file,
so the engine's ``--eval-tasks wikitext_cloze --eval-include DIR`` (or a server's
SPARSEGPT_EVAL_INCLUDE_DIRS) runs it like any harness task: acc (summed log-likelihood) and
acc_norm (per character).

    python -m benchmarks.zeroshot_task /tmp/tasks            # 400 questions, seed 0
    sparsegpt prune models/smollm2-135m --sparsity 0.5 ... --eval-tasks wikitext_cloze --eval-include /tmp/tasks
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

PROTOCOL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "protocol-p"
NAME = "wikitext_cloze"
CONTEXT_WORDS = 32
CHOICE_WORDS = 5


def paragraphs(text: str) -> list[list[str]]:
    """The article paragraphs (no headings, no short lines) as word lists."""
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith("="):
            continue
        words = line.split()
        if len(words) >= CONTEXT_WORDS + CHOICE_WORDS + 8:
            out.append(words)
    return out


def questions(text: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    paras = paragraphs(text)
    rows = []
    for k in rng.sample(range(len(paras)), min(n, len(paras))):
        words = paras[k]
        i = rng.randrange(CONTEXT_WORDS, len(words) - CHOICE_WORDS + 1)
        true = " ".join(words[i : i + CHOICE_WORDS])
        others: list[str] = []
        while len(others) < 3:
            other = paras[rng.randrange(len(paras))]
            j = rng.randrange(0, len(other) - CHOICE_WORDS + 1)
            span = " ".join(other[j : j + CHOICE_WORDS])
            if other is not words and span != true and span not in others:
                others.append(span)
        choices = [true, *others]
        rng.shuffle(choices)
        rows.append(
            {"question": " ".join(words[i - CONTEXT_WORDS : i]), "choices": choices, "label": choices.index(true)}
        )
    return rows


def write_task(directory: Path, rows: list[dict], name: str = NAME) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = (directory / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n",
        encoding="utf-8",
    )
    return directory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path)
    p.add_argument("--n", type=int, default=400, help="questions (default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", type=Path, default=PROTOCOL_DATA / "eval.txt")
    args = p.parse_args(argv)
    text = args.text.read_text(encoding="utf-8")
    rows = questions(re.sub(r" @(.)@ ", r"\1", text), args.n, args.seed)  # WikiText's " @-@ " is "-"
    write_task(args.directory, rows)
    print(f"{len(rows)} questions in {args.directory / (NAME + '.yaml')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
