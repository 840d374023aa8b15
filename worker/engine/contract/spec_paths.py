"""Paths into a job spec's nested dict: every field's path, reading and setting one by its path.

Pure Python + pydantic: importing this module loads no torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel


def field_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The path of every field of the spec, depth first."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if getattr(annotation, "__args__", None) and type(None) in annotation.__args__:  # X | None
            inner = [a for a in annotation.__args__ if a is not type(None)]
            annotation = inner[0] if len(inner) == 1 else annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from field_paths(annotation, (*prefix, name))
        else:
            yield (*prefix, name)


def set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value


def get_path(data: dict[str, Any], path: tuple[str, ...], default: Any = None) -> Any:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return default
        data = data[part]
    return data
