"""Artifact formats: one packager per format, in one registry.

A packager turns a job's saved model directory into one downloadable file (an archive or a
single file) and names its media type and file extension. Its bytes must be the same every time
from the same directory: the local store keeps only the directory and packages it again at each
download (the size and sha256 recorded once hold), and any byte range of it must be what the
whole download would have had there (HTTP Range, a resumed ``sparsegpt pull``).

Adding a format is one ``Packager`` subclass and ``register(...)``: the worker publishes every
registered format that ``applies_to`` the job (``app/job_files.py``), the API lists and serves
them (``GET /api/v1/jobs/{id}/artifacts/{format}``), ``sparsegpt pull --format`` fetches one.
``hf-tar`` (the Hugging Face directory as one tar) is the first and the default. A job that
quantizes has two instead (issue 26): ``compressed-tensors`` (its default: the quantized checkpoint)
and ``dense`` (the float one). The engine writes them as ``<saved dir>/compressed-tensors/`` and
``<saved dir>/dense/``; the row's location stays the saved directory and each packager finds its
own part of it (``source``), so the local store's rebuild at download needs nothing more.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app import archive

DEFAULT_FORMAT = "hf-tar"


class Packager:
    """One artifact format. Subclasses set the three names and write ``stream``."""

    format: str = ""  # its name in the API and the CLI: lowercase letters, digits, '-'
    media_type: str = "application/octet-stream"
    extension: str = ""  # the download's file name is <prefix><extension>
    unpacks: bool = False  # a tar with one top directory that ``sparsegpt pull`` unpacks
    description: str = ""

    def applies_to(self, spec: dict[str, Any]) -> bool:
        """Whether a job with this stored spec gets this format (default: every job)."""
        return True

    def source(self, model_dir: Path) -> Path:
        """The directory this format packages, within the job's saved directory (default: all of it)."""
        return model_dir

    def stream(self, model_dir: Path, prefix: str) -> Iterator[bytes]:
        """The whole file, in order; ``prefix`` is the job's name (an archive's top directory)."""
        raise NotImplementedError

    def iter_bytes(self, model_dir: Path, prefix: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes [start, end) of ``stream`` (this default reads through what comes before)."""
        offset = 0
        for chunk in self.stream(model_dir, prefix):
            if end is not None and offset >= end:
                return
            lo, hi = max(start - offset, 0), len(chunk) if end is None else min(len(chunk), end - offset)
            if lo < hi:
                yield chunk[lo:hi]
            offset += len(chunk)

    def digest(self, model_dir: Path, prefix: str) -> tuple[int, str]:
        """(size in bytes, sha256 hex) of ``stream``."""
        sha, size = hashlib.sha256(), 0
        for chunk in self.stream(model_dir, prefix):
            sha.update(chunk)
            size += len(chunk)
        return size, sha.hexdigest()

    def file_name(self, prefix: str) -> str:
        return f"{prefix}{self.extension}"


class HfTar(Packager):
    """The Hugging Face directory (config, tokenizer, safetensors, model card) as one tar whose
    top directory is the job's name; ranges are cut from the stream without producing the rest."""

    format = DEFAULT_FORMAT
    media_type = archive.MEDIA_TYPE
    extension = ".tar"
    unpacks = True
    description = "the Hugging Face directory as one tar (AutoModelForCausalLM.from_pretrained loads it)"

    def applies_to(self, spec: dict[str, Any]) -> bool:
        return not is_quantizing(spec)  # a quantizing job's two formats replace it

    def top(self, prefix: str) -> str:
        """The archive's one top directory."""
        return prefix

    def stream(self, model_dir: Path, prefix: str) -> Iterator[bytes]:
        return archive.iter_tar(self.source(model_dir), self.top(prefix))

    def iter_bytes(self, model_dir: Path, prefix: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        return archive.iter_tar(self.source(model_dir), self.top(prefix), start, end)

    def digest(self, model_dir: Path, prefix: str) -> tuple[int, str]:
        return archive.digest(self.source(model_dir), self.top(prefix))


class QuantizedFormatTar(HfTar):
    """One of a quantizing job's saved formats (``<saved dir>/<format>/``, a whole Hugging Face
    directory) as one tar; its top directory and file name carry the format's name, so that the two
    downloads of one job never land on each other."""

    def __init__(self, name: str, description: str):
        self.format, self.description = name, description
        self.extension = f"-{name}.tar"

    def applies_to(self, spec: dict[str, Any]) -> bool:
        return is_quantizing(spec)

    def source(self, model_dir: Path) -> Path:
        return model_dir / self.format

    def top(self, prefix: str) -> str:
        return f"{prefix}-{self.format}"


def is_quantizing(spec: dict[str, Any]) -> bool:
    """Whether a stored spec quantizes its weights (its ``quantization`` section is set)."""
    return bool((spec or {}).get("quantization"))


_registry: dict[str, Packager] = {}


def register(packager: Packager) -> Packager:
    """Add a format (its name must be new); returns it."""
    name = packager.format
    if not name or not all(c.islower() or c.isdigit() or c == "-" for c in name) or len(name) > 32:
        raise ValueError(f"format name {name!r}: 1 to 32 lowercase letters, digits or '-'")
    if name in _registry:
        raise ValueError(f"format {name!r} is registered already")
    _registry[name] = packager
    return packager


def unregister(name: str) -> None:
    if name == DEFAULT_FORMAT:
        raise ValueError(f"{DEFAULT_FORMAT!r} is the default format")
    _registry.pop(name, None)


def get(name: str) -> Packager | None:
    return _registry.get(name)


def formats() -> list[str]:
    return list(_registry)


def for_job(spec: dict[str, Any]) -> list[Packager]:
    """The formats a job with this stored spec is published in (the default first)."""
    return [p for p in _registry.values() if p.applies_to(spec)]


def default_for(spec: dict[str, Any]) -> str:
    """The format a job's plain download (``/artifact``, ``sparsegpt pull`` without --format) serves."""
    return QUANTIZED_DEFAULT if is_quantizing(spec) else DEFAULT_FORMAT


def format_ratios(result: dict[str, Any] | None) -> dict[str, float]:
    """Each saved format's size over the dense fp16 model's, as a quantizing job's report has them
    (``quantization.sizes.formats``); {} for other jobs."""
    sizes = ((result or {}).get("quantization") or {}).get("sizes") or {}
    formats = sizes.get("formats") or {}
    return {name: f["ratio"] for name, f in formats.items() if isinstance(f, dict) and f.get("ratio") is not None}


def engine_formats(spec: dict[str, Any]) -> tuple[str, ...]:
    """The formats the engine saves for a job (RunOptions.formats): a quantizing job's two, each in a
    directory of its own; () otherwise (the saved directory is the model itself)."""
    return (QUANTIZED_DEFAULT, DENSE) if is_quantizing(spec) else ()


QUANTIZED_DEFAULT = "compressed-tensors"  # worker.engine.quantized_job.COMPRESSED: the engine's directory names
DENSE = "dense"  # worker.engine.quantized_job.DENSE

register(HfTar())
register(
    QuantizedFormatTar(
        QUANTIZED_DEFAULT,
        "the quantized checkpoint (compressed-tensors) as one tar: vLLM and transformers load it as it is",
    )
)
register(QuantizedFormatTar(DENSE, "the same model with float weights (the dequantized grid values) as one tar"))
