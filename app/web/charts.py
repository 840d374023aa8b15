"""The dashboard's charts, drawn as SVG here and styled by app/static/dashboard.css: bars per
block (the job page) and lines per job over the blocks (the comparison). Every label is escaped."""

from __future__ import annotations

import math

from markupsafe import Markup, escape

from worker.engine.contract.report import Profile

PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")
_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 640, 240, 56, 16, 28, 36


def _nice_max(value: float) -> float:
    if value <= 0 or not math.isfinite(value):
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent:
            return step * exponent
    return 10 * exponent


def _tick(value: float) -> str:
    return f"{value:.3g}"


def _frame(title: str, y_max: float, x_label: str = "block") -> list[str]:
    plot_h = _H - _TOP - _BOTTOM
    parts = [
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text class="chart-title" x="{_LEFT}" y="16">{escape(title)}</text>',
    ]
    for i in range(5):
        y = _TOP + plot_h - plot_h * i / 4
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(
            f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick(y_max * i / 4)}</text>'
        )
    parts.append(
        f'<text class="axis-label" x="{(_LEFT + _W - _RIGHT) / 2:.0f}" y="{_H - 4}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
    )
    return parts


def bar_chart(
    labels: list[str],
    values: list[float | None],
    *,
    title: str,
    y_max: float | None = None,
    value_format: str = "{:.3g}",
    css: str = "bar",
) -> Markup:
    """One bar per label (a block); missing values are left empty."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = y_max if y_max is not None else _nice_max(max(finite, default=0.0))
    parts = _frame(title, top)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    slot = plot_w / max(1, len(labels))
    width = max(2.0, slot * 0.7)
    for i, (label, value) in enumerate(zip(labels, values)):
        x = _LEFT + slot * i + (slot - width) / 2
        if len(labels) <= 32 or i % math.ceil(len(labels) / 32) == 0:
            parts.append(
                f'<text class="tick" x="{x + width / 2:.1f}" y="{_TOP + plot_h + 14}" '
                f'text-anchor="middle">{escape(label)}</text>'
            )
        if value is None or not math.isfinite(value):
            continue
        height = plot_h * min(value, top) / top if top else 0
        y = _TOP + plot_h - height
        shown = value_format.format(value)
        parts.append(
            f'<rect class="{css}" x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{max(height, 0.5):.1f}">'
            f"<title>block {escape(label)}: {escape(shown)}</title></rect>"
        )
        if len(labels) <= 16:
            parts.append(
                f'<text class="bar-value" x="{x + width / 2:.1f}" y="{y - 4:.1f}" '
                f'text-anchor="middle">{escape(shown)}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def line_chart(series: list[tuple[str, list[tuple[int, float]]]], *, title: str, x_label: str) -> Markup:
    """One polyline (with points) per series over integer x (blocks), and a legend."""
    xs = [x for _, points in series for x, _ in points]
    ys = [y for _, points in series for _, y in points if math.isfinite(y)]
    top = _nice_max(max(ys, default=0.0))
    parts = _frame(title, top, x_label)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    lo, hi = (min(xs), max(xs)) if xs else (0, 1)
    span = max(1, hi - lo)

    pad = 18.0

    def px(x: int) -> float:
        return _LEFT + pad + (plot_w - 2 * pad) * ((x - lo) / span if hi > lo else 0.5)

    def py(y: float) -> float:
        return _TOP + plot_h - plot_h * min(y, top) / top

    for x in range(lo, hi + 1) if xs and hi - lo <= 40 else []:
        parts.append(f'<text class="tick" x="{px(x):.1f}" y="{_TOP + plot_h + 14}" text-anchor="middle">{x}</text>')
    for index, (name, points) in enumerate(series):
        color = PALETTE[index % len(PALETTE)]
        points = [(x, y) for x, y in points if math.isfinite(y)]
        if len(points) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
            parts.append(f'<polyline class="series" data-series="{escape(name)}" points="{path}" stroke="{color}"/>')
        for x, y in points:
            parts.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}"><title>{escape(name)}, block '
                f"{x}: {y:.4g}</title></circle>"
            )
        legend_x = _W - _RIGHT - 120 * (len(series) - index)
        parts.append(f'<rect x="{legend_x}" y="8" width="12" height="4" fill="{color}"/>')
        label = name if points else f"{name} (none)"
        parts.append(f'<text class="legend" x="{legend_x + 16}" y="14">{escape(label)}</text>')
    if not ys:
        parts.append(
            f'<text class="empty" x="{_W / 2}" y="{_H / 2}" text-anchor="middle">no per-block results yet</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def profile_chart(profile: Profile | dict | None) -> Markup | None:
    """Per block, the sparsity asked (the report's ``profile.targets``: uniform, OWL's or the user's)
    beside the sparsity achieved (``profile.achieved``), in %; blocks left dense are skipped. None
    without a profile (a job from an older version) or when every block has the same target."""
    if isinstance(profile, dict):
        profile = Profile.model_validate(profile)
    if profile is None:
        return None
    targets, achieved = profile.targets, profile.achieved
    rows = [
        (b, t, a)
        for b, (t, a) in enumerate(zip(targets, achieved))
        if isinstance(t, (int, float)) and isinstance(a, (int, float)) and math.isfinite(t) and math.isfinite(a)
    ]
    if not rows or max(t for _, t, _ in rows) - min(t for _, t, _ in rows) < 1e-9:
        return None  # one target for every block (uniform): the bars would only draw a flat line
    kind = str(profile.profile or "uniform")
    parts = _frame(f"Sparsity per block, {kind}: target vs achieved (%)", 100.0)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    slot = plot_w / len(rows)
    width = max(1.0, slot * 0.38)
    colors = {"target": "#9ca3af", "achieved": PALETTE[0]}
    for i, (block, target, done) in enumerate(rows):
        x0 = _LEFT + slot * i + slot * 0.1
        if len(rows) <= 32 or i % math.ceil(len(rows) / 32) == 0:
            parts.append(
                f'<text class="tick" x="{x0 + width:.1f}" y="{_TOP + plot_h + 14}" text-anchor="middle">{block}</text>'
            )
        for j, (name, value) in enumerate((("target", target), ("achieved", done))):
            height = plot_h * min(max(value, 0.0), 1.0)
            parts.append(
                f'<rect class="bar-{name}" data-block="{block}" x="{x0 + j * width:.1f}" '
                f'y="{_TOP + plot_h - height:.1f}" '
                f'width="{width:.1f}" height="{max(height, 0.5):.1f}" fill="{colors[name]}">'
                f"<title>block {block}: {name} {100 * value:.2f}%</title></rect>"
            )
    for index, name in enumerate(("target", "achieved")):
        legend_x = _W - _RIGHT - 90 * (2 - index)
        parts.append(f'<rect x="{legend_x}" y="8" width="12" height="8" fill="{colors[name]}"/>')
        parts.append(f'<text class="legend" x="{legend_x + 16}" y="16">{name}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
