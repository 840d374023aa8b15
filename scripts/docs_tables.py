"""The tables of the docs that are generated from the code, so the pages cannot drift from it.

docs/api.md's table of the job spec's fields comes from ``worker.engine.contract.spec.JobSpec``: each field's
JSON path, type, default, CLI flag and the spec's own description (the one text the form, the CLI's
--help and the API's OpenAPI schema show as well); docs/engine.md's table of the pruning methods
from ``worker.engine.contract.method_table``. Run it after a change of either:

    .venv/bin/python scripts/docs_tables.py          # rewrite the generated blocks in place
    .venv/bin/python scripts/docs_tables.py --check  # exit 1 when a page is stale (tests/test_docs.py)

A generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->``.
Pure Python + pydantic: it imports no torch.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from worker.engine.contract.spec import JobSpec  # noqa: E402  (after the repository is on sys.path)
from worker.engine.contract.spec_sections import UI  # noqa: E402


def _type(annotation: Any) -> str:
    """A field's type in JSON words: `"a" \\| "b"` for a choice, else string/integer/number/boolean/list."""
    if get_origin(annotation) is Literal:
        return " \\| ".join(f'`"{a}"`' for a in get_args(annotation))
    if get_origin(annotation) in (list, tuple):
        return "list of " + _type(get_args(annotation)[0]).replace("string", "strings").replace("number", "numbers")
    args = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    words = []
    for arg in args:
        if get_origin(arg) in (list, tuple):
            words.append(_type(arg))
        else:
            words.append(names.get(arg, getattr(arg, "__name__", str(arg))))
    nullable = type(None) in get_args(annotation)
    return " or ".join(dict.fromkeys(words)) + (" or null" if nullable else "")


def _default(info) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, list):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    return f"`{value}`"


def spec_fields(model: type[BaseModel] = JobSpec, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf field of the spec, depth first in declaration order: (JSON path, FieldInfo)."""
    for name, info in model.model_fields.items():
        key = prefix + (info.alias or name)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from spec_fields(annotation, key + ".")
        else:
            yield key, info


def spec_table() -> str:
    rows = ["| field | type | default | CLI flag | what it is |", "|---|---|---|---|---|"]
    for key, info in spec_fields():
        ui = next((m for m in info.metadata if isinstance(m, UI)), None)
        flag = f"`{ui.cli}`" if ui is not None and ui.cli else ""
        text = (info.description or "").replace("|", "\\|").replace("<", "&lt;")
        rows.append(f"| `{key}` | {_type(info.annotation)} | {_default(info)} | {flag} | {text} |")
    return "\n".join(rows)


def methods_table() -> str:
    """The pruning methods of worker.engine.contract.method_table: what each reads of the data and allows."""
    from worker.engine.contract.method_table import METHOD_TABLE

    reads = {"hessian": "the Hessian H = (2/n) X X^T", "diag": "the inputs' norms (diag H)", "none": "nothing"}
    yes = {True: "yes", False: "no"}
    rows = [
        "| method | what it does | reads of the calibration data | N:M | refit | `wbits` | `exact` |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METHOD_TABLE.values():
        summary = m.summary.replace("|", "\\|")
        rows.append(
            f"| `{m.name}` | {summary} | {reads[m.statistics]} | {yes[m.nm]} | {yes[m.allows_refit]} | "
            f"{yes[m.joint_quantization]} | {yes[m.exact]} |"
        )
    return "\n".join(rows)


BLOCKS = {"docs/api.md": {"spec-fields": spec_table}, "docs/engine.md": {"methods": methods_table}}


def render(text: str, blocks: dict) -> str:
    """The page with each generated block replaced by its current table."""
    for name, make in blocks.items():
        pattern = re.compile(rf"(<!-- generated: {name} -->\n)(?:.*?\n)?(<!-- end: {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"docs_tables: the page has no block {name!r}")
        table = make()
        text = pattern.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a page differs from the code")
    args = p.parse_args(argv)
    stale = []
    for page, blocks in BLOCKS.items():
        path = REPO / page
        text = path.read_text(encoding="utf-8")
        new = render(text, blocks)
        if new != text:
            stale.append(page)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if stale:
        print(("stale: " if args.check else "rewrote: ") + ", ".join(stale), file=sys.stderr)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
