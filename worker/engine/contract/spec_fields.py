"""Walking the job spec's fields and saying its errors in plain words.

``leaf_fields()`` lists every field a person sets (those with a ``UI`` marker), so the form and
the CLI are built from the spec itself; ``plain_message``/``first_error`` turn pydantic's errors
into the one sentence the form, the API's 422 and the CLI all show.

Pure Python + pydantic: importing this module loads no torch (the API imports it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from worker.engine.contract.spec import JobSpec
from worker.engine.contract.spec_sections import UI

# --- walking the spec's fields (the form and the CLI are built from this) ----------------------


@dataclass(frozen=True)
class Leaf:
    """One field a person sets: its path in the spec (``("solver", "blocksize")``)."""

    path: tuple[str, ...]
    info: FieldInfo
    ui: UI

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def kind(self) -> str:
        """bool, int, float, list or str (what a text input or a flag is converted to)."""
        annotation = self.info.annotation
        args = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
        if get_origin(annotation) is list or any(get_origin(a) is list for a in args):
            return "list"
        for kind in (bool, int, float):
            if args == [kind]:
                return kind.__name__
        return "str"

    @property
    def required(self) -> bool:
        return self.info.is_required()

    @property
    def default(self) -> Any:
        return None if self.required else self.info.get_default(call_default_factory=True)

    @property
    def choices(self) -> tuple[str, ...] | None:
        args = get_args(self.info.annotation)
        return args if get_origin(self.info.annotation) is Literal else None


def leaf_fields(model: type[BaseModel] = JobSpec, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every field of the spec, depth first, that has a UI marker (in declaration order)."""
    for name, info in model.model_fields.items():
        section = section_model(info.annotation)
        if section is not None:
            yield from leaf_fields(section, (*prefix, name))
            continue
        ui = next((m for m in info.metadata if isinstance(m, UI)), None)
        if ui is not None:
            yield Leaf((*prefix, name), info, ui)


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a nested section: ``CalibrationSpec``, or ``QuantizationSpec`` of ``QuantizationSpec | None``."""
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


@cache
def leaf_paths() -> dict[str, tuple[str, ...]]:
    """Each leaf's path by its dotted name (``"solver.wbits"``), computed once."""
    return {leaf.dotted: leaf.path for leaf in leaf_fields()}


# --- errors in plain words (the form and the CLI say the same thing) --------------------------

_PLAIN = {
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be more than {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "int_parsing_size": "is too large a number",
    "int_type": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false",
    "missing": "is required",
    "string_too_short": "is required",
    "string_too_long": "is too long (at most {max_length} characters)",
    "literal_error": "must be one of {expected}",
}


def plain_message(error: dict[str, Any]) -> str:
    """A pydantic error entry in plain words; the spec's own messages are kept as they are."""
    template = _PLAIN.get(str(error.get("type")))
    if template:
        try:
            text = template.format(**(error.get("ctx") or {}))
        except (KeyError, IndexError):
            return _strip_prefix(str(error.get("msg", "invalid")))
        text = text[0].upper() + text[1:]
        raw = error.get("input")
        if isinstance(raw, (str, int, float)) and not isinstance(raw, bool) and str(raw).strip():
            text += f" (got {str(raw)[:60]})"
        return text
    return _strip_prefix(str(error.get("msg", "invalid")))


def _strip_prefix(msg: str) -> str:
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def error_path(error: dict[str, Any]) -> tuple[str, ...]:
    """The spec path an error belongs to. A check across fields (raised with no location) names
    the field it is about at the start of its message (``solver.wbits ...``)."""
    loc = tuple(p for p in error.get("loc", ()) if p != "body" and isinstance(p, str))
    msg = _strip_prefix(str(error.get("msg", "")))
    dotted = msg.split(" ", 1)[0].rstrip(":")  # "quantization.group_size: ..." names it too
    leaves = leaf_paths()
    if dotted in leaves and (not loc or leaves[dotted][: len(loc)] == loc):
        return leaves[dotted]
    return loc


def first_error(exc: Exception) -> tuple[tuple[str, ...], str]:
    """(path, plain message) of the first problem of a ValidationError."""
    errors = exc.errors() if hasattr(exc, "errors") else [{"msg": str(exc), "loc": ()}]
    return error_path(errors[0]), plain_message(errors[0])
