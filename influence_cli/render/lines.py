"""Inline SVG line plots (the fixing curve of `infl evaluate --fix`)."""

from __future__ import annotations

from html import escape
from typing import Mapping, Optional, Sequence

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f")
DASHES = ("", "6 3", "2 3", "8 3 2 3")


def line_plot_svg(
    series: Mapping[str, Sequence[tuple[float, Optional[float]]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    y_range: tuple[float, float],
    percent: bool = True,
    width: int = 470,
    height: int = 280,
) -> str:
    """Lines of (x, y) points per series name (None y values are skipped), with a legend."""
    left, right, top, bottom = 56, 130, 28, 44
    pw, ph = width - left - right, height - top - bottom
    xs = [x for pts in series.values() for x, _y in pts] or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_lo, y_hi = y_range if y_range[1] > y_range[0] else (y_range[0], y_range[0] + 1)

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * pw

    def py(y: float) -> float:
        return top + ph - (y - y_lo) / (y_hi - y_lo) * ph

    def label(v: float) -> str:
        return f"{100 * v:.0f}%" if percent else f"{v:g}"

    parts = [f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{escape(title)}" '
             'style="font: 11px sans-serif">', f'<text x="{left}" y="16" font-weight="bold">{escape(title)}</text>']
    for k in range(5):
        y = y_lo + (y_hi - y_lo) * k / 4
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 5}" y="{py(y) + 4:.1f}" text-anchor="end">{label(y)}</text>')
    for x in sorted(set(xs)):
        parts.append(f'<text x="{px(x):.1f}" y="{top + ph + 15}" text-anchor="middle">{label(x)}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    parts.append(f'<text transform="translate(13 {top + ph / 2}) rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        colour, dash = COLOURS[i % len(COLOURS)], DASHES[(i // len(COLOURS)) % len(DASHES)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts if y is not None)
        style = f'stroke="{colour}" stroke-width="2" fill="none"' + (f' stroke-dasharray="{dash}"' if dash else "")
        parts.append(f'<polyline points="{coords}" {style}><title>{escape(name)}</title></polyline>')
        ly = top + 12 + 16 * i
        parts.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 30}" y1="{ly}" y2="{ly}" {style}/>')
        parts.append(f'<text x="{left + pw + 34}" y="{ly + 4}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


__all__ = ["line_plot_svg"]
