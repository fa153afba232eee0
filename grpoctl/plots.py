"""Line charts as self-contained SVG text: the run report and the model card draw their plots with this.

No plotting library: a chart of a few hundred points is a polyline, axes and labels, and SVG written here
opens in any browser, on the Hub and in an HTML file without scripts or fonts to fetch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

# Colour-blind-safe palette (Okabe-Ito), in the order series are drawn.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")

Point = tuple[float, float]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high < low:
        low, high = high, low
    if high == low:  # a flat series: one tick at its value and one either side
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.6g}"


def line_chart(series: dict[str, Sequence[Point]], *, title: str, x_label: str = "step", y_label: str = "",
               width: int = 640, height: int = 260) -> str:
    """One SVG chart, a line with point markers per series (``name -> [(x, y), ...]``); points whose y is not
    a finite number are left out. A series of one point still shows (its marker)."""
    clean = {name: [(float(x), float(y)) for x, y in pts if y is not None and math.isfinite(float(y))]
             for name, pts in series.items()}
    clean = {name: pts for name, pts in clean.items() if pts}
    left, right, top, bottom = 64, 16, 28, 40
    legend_rows = math.ceil(len(clean) / 3) if len(clean) > 1 else 0
    legend_h = 12 + 18 * legend_rows if legend_rows else 0
    height += legend_h
    plot_w, plot_h = width - left - right, height - top - bottom - legend_h
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" role="img">',
           f"<title>{escape(title)}</title>",
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{left}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>']
    if not clean:
        out.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle" fill="#666">'
                   "no values logged</text></svg>")
        return "\n".join(out)
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    x_ticks = nice_ticks(min(xs), max(xs), 6)
    if all(float(t).is_integer() for t in xs):  # steps: integer ticks only
        x_ticks = sorted({round(t) for t in x_ticks if float(t).is_integer()}) or [round(min(xs))]
    y_ticks = nice_ticks(min(ys), max(ys), 5)
    x0, x1 = min(x_ticks[0], min(xs)), max(x_ticks[-1], max(xs))
    y0, y1 = min(y_ticks[0], min(ys)), max(y_ticks[-1], max(ys))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y0) / ((y1 - y0) or 1.0) * plot_h

    for t in y_ticks:
        y = py(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_label(t)}</text>')
    for t in x_ticks:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{top + plot_h}" x2="{x:.1f}" y2="{top + plot_h + 4}" stroke="#333"/>')
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_label(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 32}" text-anchor="middle">{escape(x_label)}</text>')
    if y_label:
        out.append(f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 14 {top + plot_h / 2})">{escape(y_label)}</text>')
    for i, (name, pts) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        out.append(f'<g><title>{escape(name)}</title>')
        if len(pts) > 1:
            out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
        out.append("</g>")
    if legend_rows:
        base = top + plot_h + bottom + 18
        for i, name in enumerate(clean):
            col, row = i % 3, i // 3
            lx, ly = left + col * (plot_w / 3), base + row * 18
            out.append(f'<rect x="{lx:.1f}" y="{ly - 9}" width="12" height="4" fill="{PALETTE[i % len(PALETTE)]}"/>')
            out.append(f'<text x="{lx + 16:.1f}" y="{ly - 4}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)
