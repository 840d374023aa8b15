"""The report's coverage in words, for the CLI's summary (pure Python: the CLI loads no torch to print it).

See worker.engine.coverage for what counts as a weight and why each dense one stayed dense.
"""

from __future__ import annotations

from collections import Counter


def sparsity_headline(report: dict) -> str:
    """Both figures: over every weight of the pruned blocks, and over the pruned layers only."""
    layers = len(report["layers"])
    if (report.get("quantization") or {}).get("quantization_only"):  # no weight pruned: zeros are rounding's
        return (
            f"quantization only, no weight pruned ({report['sparsity']:.4f} of the blocks' weights round to zero "
            f"on the grid, over {layers} quantized layers)"
        )
    if "sparsity_pruned_modules" not in report:  # a report from before coverage was counted
        return f"sparsity {report['sparsity']:.4f} over {layers} layers"
    return (
        f"sparsity {report['sparsity']:.4f} over all weights of the pruned blocks "
        f"({report['sparsity_pruned_modules']:.4f} over the {layers} pruned layers)"
    )


def coverage_lines(report: dict) -> list[str]:
    """What stayed dense inside the pruned blocks (by reason), and how the experts were calibrated."""
    lines = []
    coverage = report.get("coverage") or {}
    dense = coverage.get("dense") or []
    if dense:
        reasons = Counter(d["reason"] for d in dense)
        lines.append(
            f"left dense in the pruned blocks: {len(dense)} weight tensors, {coverage['weights_dense']:,} of "
            f"{coverage['weights']:,} weights ({'; '.join(f'{n} x {r}' for r, n in reasons.items())}); "
            "the report's coverage.dense names each"
        )
    experts = report.get("experts") or []
    if experts:
        total = sum(r["experts"] for r in experts)
        fell = sum(h == "all_tokens_fallback" for r in experts for h in (r.get("hessian") or []))
        every = sum(h == "all_tokens" for r in experts for h in (r.get("hessian") or []))
        how = (
            "every calibration token through every expert"
            if every
            else f"each from its routed tokens; {fell} with too few took all-token Hessians"
            if any(r.get("hessian") for r in experts)
            else "by magnitude, no data"
        )
        lines.append(
            f"experts: {total} in {len(experts)} modules pruned one by one ({how}); "
            "the report's experts lists tokens per expert"
        )
    return lines
