"""A quantizing job's parts around the prune (issue 26): the checks before it runs, the formats it
saves, the report's ``quantization`` part.

The solve itself is worker.engine.methods.prune_layers (in the joint solve, or round-to-nearest after
the prune); the checkpoint is written by worker.engine.export_ct through compressed-tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from worker.engine.architectures import prunable_linears
from worker.engine.contract.method_table import method_info
from worker.engine.contract.report import FormatSize, QuantizationPart, Report
from worker.engine.contract.spec_quant import FORMATS, group_size_message
from worker.engine.errors import InvalidJob
from worker.engine.moe import quantization_refusal
from worker.engine.quant import SCHEMES, Quantization, QuantizedWeight

COMPRESSED, DENSE = FORMATS


def quantization_of(spec, dtype: torch.dtype) -> Quantization | None:
    """The engine's grid for the spec's ``quantization``; scales stored in the saved model's ``dtype``."""
    q = spec.quantization
    if q is None:
        return None
    observer = "mse" if SCHEMES[q.scheme][0] == "int" else "minmax"  # FP8: the preset's min-max, as measured
    return Quantization(
        scheme=q.scheme, group_size=q.group_size, actorder=q.actorder, scale_dtype=dtype, observer=observer
    )


def check_quantizable(quantization: Quantization, model, adapter, selection) -> None:
    """InvalidJob before anything runs: a group size that does not divide a layer's input width (by the
    config, then by the selected layers themselves), a layer compressed-tensors cannot pack (not an
    nn.Linear: GPT-2's Conv1D), fused experts whose quantized layout does not load."""
    message = group_size_message(model.config.to_dict(), quantization.group_size)
    if message:
        raise InvalidJob(message)
    for i, block in enumerate(adapter.blocks):
        if not selection.block_selected(i):
            continue
        prefix = adapter.block_name(i)
        for name, module in prunable_linears(block).items():
            full = f"{prefix}.{name}"
            if not selection.module_selected(full):
                continue
            if type(module) is not nn.Linear:
                raise InvalidJob(
                    f"quantization: {full} is a {type(module).__name__}, not a Linear; compressed-"
                    "tensors packs Linear weights only, so this model cannot be saved quantized"
                )
            width = module.weight.shape[1]
            if quantization.group_size != -1 and width % quantization.group_size:
                raise InvalidJob(
                    f"quantization.group_size {quantization.group_size} does not divide the input "
                    f"width of {full} ({width}): use a group size dividing it, or -1 (per channel)"
                )
        refusal = quantization_refusal(block)
        if refusal:
            raise InvalidJob(
                f"quantization: block {i} {refusal}; the job is refused rather than leaving its experts in float"
            )


def formats_of(formats: tuple[str, ...] | None, quantization: Quantization | None) -> tuple[str, ...]:
    """The formats a run saves: the asked ones, else the compressed checkpoint when quantizing."""
    if not formats:
        return (COMPRESSED,) if quantization is not None else (DENSE,)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or len(set(formats)) != len(formats):
        raise InvalidJob(f"formats {', '.join(formats)}: each of {', '.join(FORMATS)} at most once")
    if COMPRESSED in formats and quantization is None:
        raise InvalidJob("the compressed-tensors format holds quantized weights: set quantization")
    return tuple(sorted(formats, key=FORMATS.index, reverse=True))  # dense first: written before compression


def writers(
    model, formats: tuple[str, ...], quantization: Quantization | None, quantized: dict[str, QuantizedWeight]
) -> dict[str, Callable[[Path], None]]:
    """Each format's writer for checkpoint.save_pruned, dense first (the compressed one compresses the
    model in place)."""
    from worker.engine.export_ct import save_quantized_model

    linears = {k: v for k, v in quantized.items() if ":" not in k}
    experts = {k: v for k, v in quantized.items() if ":" in k}
    out: dict[str, Callable[[Path], None]] = {}
    for name in formats:
        if name == DENSE:
            out[name] = lambda d: model.save_pretrained(d, safe_serialization=True)
        else:
            out[name] = lambda d: save_quantized_model(model, linears, quantization, d, experts)
    return out


def compress_for_evaluation(model, quantization: Quantization, quantized: dict[str, QuantizedWeight]) -> None:
    """No checkpoint written: the model compressed in memory all the same, so that it is evaluated as
    the checkpoint would load (FP8_DYNAMIC's activations quantized per token)."""
    from worker.engine.export_ct import compress_in_memory

    compress_in_memory(model, {k: v for k, v in quantized.items() if ":" not in k}, quantization)


def _quantized_bytes(q: QuantizedWeight, bits: int) -> int:
    """A layer as stored: each code's bits (packed) plus its scales in their dtype."""
    return (q.codes.numel() * bits + 7) // 8 + q.scale.numel() * q.scale.element_size()


def quantization_part(
    spec,
    quantization: Quantization,
    quantized: dict[str, QuantizedWeight],
    model,
    coverage_dense: list,
    dense_parameters: int,
    layers: list | None = None,
    two_passes: dict[int, str] | None = None,
) -> QuantizationPart:
    """The report's ``quantization`` part, its formats' sizes not yet known (``settle_sizes``);
    ``dense_parameters``: the model's parameters as loaded (the model may be compressed by now);
    ``layers``: the report's layers (their blocks, and how many passes solved each); ``two_passes``: why
    a block ran twice where one pass was asked (worker.engine.sequential)."""
    joint = method_info(spec.method).joint_quantization and spec.solver.refit == "none"
    decoder = sum(_quantized_bytes(q, quantization.bits) for q in quantized.values())
    decoder_fp16 = 2 * sum(q.codes.numel() for q in quantized.values())
    unquantized = [
        {"name": name, "reason": "the output head: never pruned nor quantized (compressed-tensors' ignore list)"}
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.endswith("lm_head")
    ]
    for d in coverage_dense:
        d = d if isinstance(d, dict) else d.model_dump()
        unquantized.append({"name": d["name"], "reason": d["reason"]})
    first, last = spec.layers.first_block, spec.layers.last_block
    if first is not None or last is not None:
        unquantized.append(
            {
                "name": f"the blocks outside {first or 0}..{'last' if last is None else last}",
                "reason": "outside the layer selection: neither pruned nor quantized",
            }
        )
    return QuantizationPart.model_validate(
        {
            "scheme": quantization.scheme,
            "group_size": quantization.group_size,
            "actorder": quantization.actorder,
            "bits": quantization.bits,
            "observer": quantization.observer,
            "how": "in-solve" if joint else "round-to-nearest",
            "blocks_one_pass": len({r.block for r in layers or [] if r.passes == 1}),
            "blocks_two_passes": len({r.block for r in layers or [] if r.passes == 2}),
            "two_passes": [{"block": b, "reason": why} for b, why in sorted((two_passes or {}).items())],
            "quantization_only": spec.pattern.sparsity == 0,
            "layers_quantized": len(quantized),
            "experts_quantized": sum(1 for k in quantized if ":" in k),
            "unquantized": unquantized,
            "sizes": {
                "dense_fp16_bytes": 2 * dense_parameters,
                "decoder_weights_bytes": decoder,
                "decoder_weights_fp16_bytes": decoder_fp16,
                "decoder_weights_ratio": decoder / decoder_fp16 if decoder_fp16 else None,
                "formats": {},
            },
        }
    )


def settle_sizes(report: Report, directories: dict[str, Path], files: Callable[[dict], list[str]]) -> None:
    """Each format's bytes in ``report.quantization``, counted as the directory will hold them: its
    files so far plus ``files(report_dict)``, the texts still to be written into it (the card and the
    report, which state these very sizes). Repeated until the count holds (a digit more in a size can
    lengthen the texts); two or three rounds."""
    from worker.engine.checkpoint import directory_bytes

    sizes = report.quantization.sizes
    written = {name: directory_bytes(d) for name, d in directories.items()}
    for _ in range(10):
        extra = sum(len(text.encode("utf-8")) for text in files(report.to_dict()))
        formats = {
            name: FormatSize(bytes=n + extra, ratio=round((n + extra) / sizes.dense_fp16_bytes, 4))
            for name, n in written.items()
        }
        if formats == sizes.formats:
            return
        sizes.formats = formats
