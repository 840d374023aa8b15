"""The report's quantization part in words (issue 26): the CLI summary's lines and the card's section.

What grid, how it was applied, how many layers (experts among them) were quantized, which stayed in
float and why, and each saved format's bytes beside the dense model's size in fp16. No torch here:
it reads the typed report (``worker.engine.contract.report``).
"""

from __future__ import annotations

from worker.engine.contract.report import QuantizationPart

HOW = {
    "in-solve": "inside the SparseGPT solve (the pruned and the kept weights' errors compensated together)",
    "round-to-nearest": "round-to-nearest on the grid after the prune (and the refit, if any), the mask kept",
}
RUNTIME_NOTE = (
    "Sparsity brings no extra size or speed in today's runtimes (vLLM, transformers): the pruned "
    "weights are stored as quantized zeros, and the bytes come from the bits."
)


OBSERVER = {
    "mse": "scales searched for the least rounding error",
    "minmax": "scales from each group's largest weight",
}


def scheme_text(q: QuantizationPart) -> str:
    group = "one scale per output channel" if q.group_size == -1 else f"group size {q.group_size}"
    observer = f", {OBSERVER[q.observer]}" if q.observer in OBSERVER else ""
    return f"{q.scheme} ({group}{', act order' if q.actorder else ''}{observer})"


def order_text(q: QuantizationPart) -> str:
    """Which Hessians the solve read: one pass per block (the solved layers before), or the dense block's;
    "" where one pass was not asked (round to nearest, or a report without it)."""
    one, two = q.blocks_one_pass or 0, q.blocks_two_passes or 0
    if not one and not q.two_passes:
        return ""
    parts = []
    if one:
        parts.append(
            f"{one} block{'s' if one != 1 else ''} solved in one pass each, every layer's Hessian from the block's "
            "layers before it as quantized"
        )
    if two:
        reasons = sorted({entry.get("reason") for entry in q.two_passes if entry.get("reason")})
        why = f" ({'; '.join(reasons)})" if reasons else ""
        parts.append(f"{two} block{'s' if two != 1 else ''} in two passes, every Hessian from the dense block{why}")
    return "; ".join(parts)


def size_text(nbytes: int | None) -> str:
    if nbytes is None:
        return "?"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def format_sizes(q: QuantizationPart) -> list[tuple[str, int | None, float | None]]:
    """(format, bytes, ratio to the dense model in fp16) of each saved format, as the report has them."""
    formats = q.sizes.formats if q.sizes else {}
    return [(name, size.bytes, size.ratio) for name, size in formats.items()]


def quantization_lines(q: QuantizationPart | None) -> list[str]:
    """The CLI summary's lines about the quantization; [] without one."""
    if q is None:
        return []
    how = HOW.get(q.how or "", q.how or "?")
    only = " (quantization only: no weight pruned, i.e. GPTQ through the solver)" if q.quantization_only else ""
    experts = f", of which {q.experts_quantized} expert matrices" if q.experts_quantized else ""
    lines = [f"quantization {scheme_text(q)}{only}: {how}"]
    if order := order_text(q):
        lines.append(f"  {order}")
    lines.append(f"  quantized {q.layers_quantized} layers{experts}")
    if q.sizes and q.sizes.decoder_weights_ratio is not None:
        lines[-1] += (
            f"; their weights {size_text(q.sizes.decoder_weights_bytes)} vs "
            f"{size_text(q.sizes.decoder_weights_fp16_bytes)} in fp16 ({q.sizes.decoder_weights_ratio:.3f}x)"
        )
    if q.unquantized:
        shown = "; ".join(f"{u.get('name')} ({u.get('reason')})" for u in q.unquantized[:6])
        more = f"; and {len(q.unquantized) - 6} more" if len(q.unquantized) > 6 else ""
        lines.append(f"  left in float: {shown}{more}")
    dense = q.sizes.dense_fp16_bytes if q.sizes else None
    for name, nbytes, ratio in format_sizes(q):
        ratio_text = f"{ratio:.3f}x" if ratio is not None else "?"
        lines.append(
            f"  format {name}: {size_text(nbytes)} ({nbytes} bytes), {ratio_text} the dense model in fp16 "
            f"({size_text(dense)})"
        )
    return lines


def card_section(q: QuantizationPart, output_name: str = "DIR") -> list[str]:
    """The model card's section for a quantized model: what it is, what runs it, each format's size."""
    formats = [name for name, _, _ in format_sizes(q)]
    lines = [
        "## Quantized weights",
        "",
        f"Weights quantized to **{scheme_text(q)}**, {HOW.get(q.how or '', q.how or '')}. "
        + (f"{order[0].upper()}{order[1:]}. " if (order := order_text(q)) else "")
        + f"{q.layers_quantized} layers are quantized"
        + (f" ({q.experts_quantized} of them expert matrices)" if q.experts_quantized else "")
        + "; "
        + ", ".join(f"`{u.get('name')}`" for u in q.unquantized[:8])
        + (" and others" if len(q.unquantized) > 8 else "")
        + (" stay" if q.unquantized else "none stays")
        + " in float.",
        "",
        f"The compressed-tensors checkpoint (`quantization_config` in config.json; {output_name}: its directory "
        "or Hub id) runs in:",
        "",
        f"- vLLM: `vllm serve {output_name}`",
        f'- transformers, with `compressed-tensors` installed: `AutoModelForCausalLM.from_pretrained("{output_name}")`',
        "",
        RUNTIME_NOTE,
        "",
    ]
    if "dense" in formats:
        lines += [
            "The dense format holds the same weights dequantized to floats (codes x scales): it loads "
            "anywhere `from_pretrained` works, at the dense model's size.",
            "",
        ]
    rows = format_sizes(q)
    if rows:
        dense = q.sizes.dense_fp16_bytes if q.sizes else None
        lines += [f"| format | bytes | ratio to the dense model in fp16 ({size_text(dense)}) |", "|---|---|---|"]
        lines += [f"| {name} | {size_text(n)} ({n}) | {f'{r:.3f}' if r is not None else ''} |" for name, n, r in rows]
        lines.append("")
    return lines
