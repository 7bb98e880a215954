"""The inline SVG histogram of the HTML report (log10 self-influence, flagged stacked in red)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _nice_step(span: float, target: int = 5) -> float:
    if span <= 0:
        return 1.0
    raw = span / target
    power = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * power:
            return m * power
    return 10 * power


@dataclass
class _Plot:
    """The plot area of the histogram and its data ranges."""

    width: int
    height: int
    lo: float
    hi: float
    ytop: int
    left: int = 52
    right: int = 16
    top: int = 26
    bottom: int = 46

    @property
    def pw(self) -> int:
        return self.width - self.left - self.right

    @property
    def ph(self) -> int:
        return self.height - self.top - self.bottom

    def px(self, v: float) -> float:
        return self.left + (v - self.lo) / (self.hi - self.lo) * self.pw

    def py(self, c: float) -> float:
        return self.top + self.ph - c / self.ytop * self.ph


def _y_grid(p: _Plot, ystep: int) -> list[str]:
    parts = []
    for c in range(0, p.ytop + 1, ystep):
        y = p.py(c)
        parts.append(f'<line x1="{p.left}" x2="{p.left + p.pw}" y1="{y:.1f}" y2="{y:.1f}" class="gl"/>')
        parts.append(f'<text x="{p.left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{c}</text>')
    return parts


def _x_ticks(p: _Plot) -> list[str]:
    """Ticks at nice log10 steps, labelled as powers of ten."""
    parts = []
    lo, hi, base = p.lo, p.hi, p.top + p.ph
    xstep = _nice_step(hi - lo, 6)
    xstep = max(xstep, 0.5) if hi - lo > 1 else xstep
    tick = math.ceil(lo / xstep) * xstep
    while tick <= hi + 1e-9:
        x0 = p.px(tick)
        parts.append(f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{base}" y2="{base + 5}" class="axis"/>')
        if abs(tick - round(tick)) < 1e-9:
            label = f'10<tspan dy="-6" font-size="9">{int(round(tick))}</tspan>'
        else:
            label = f"{10 ** tick:.2g}"
        parts.append(f'<text x="{x0:.1f}" y="{base + 19}" text-anchor="middle" class="tick">{label}</text>')
        tick += xstep
    return parts


def _bars(p: _Plot, all_counts: np.ndarray, flag_counts: np.ndarray, bins: int) -> list[str]:
    parts = []
    bw = p.pw / bins
    for i in range(bins):
        total, fl = int(all_counts[i]), int(flag_counts[i])
        if total == 0:
            continue
        x0 = p.left + i * bw + 0.5
        w = max(bw - 1.0, 0.5)
        h_total = max(total / p.ytop * p.ph, 2.0)
        h_flag = max(fl / p.ytop * p.ph, 2.0) if fl else 0.0
        h_rest = max(h_total - h_flag, 0.0)
        y_rest = p.top + p.ph - h_total
        if h_rest > 0:
            parts.append(
                f'<rect x="{x0:.1f}" y="{y_rest:.1f}" width="{w:.1f}" height="{h_rest:.1f}" class="bar">'
                f"<title>{total - fl} not flagged</title></rect>"
            )
        if fl:
            parts.append(
                f'<rect x="{x0:.1f}" y="{p.top + p.ph - h_flag:.1f}" width="{w:.1f}" height="{h_flag:.1f}" '
                f'class="bar-flag"><title>{fl} flagged</title></rect>'
            )
    return parts


def _axes_and_legend(p: _Plot, flagged: int) -> list[str]:
    left, top, pw, ph = p.left, p.top, p.pw, p.ph
    lx = left + pw - 180
    return [
        f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" class="axis"/>',
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" class="axis"/>',
        f'<text x="{left + pw / 2}" y="{p.height - 6}" text-anchor="middle" class="label">'
        "self-influence (log scale)</text>",
        f'<text transform="translate(13 {top + ph / 2}) rotate(-90)" text-anchor="middle" class="label">'
        "training examples</text>",
        f'<rect x="{lx}" y="6" width="10" height="10" class="bar"/>',
        f'<text x="{lx + 14}" y="15" class="tick">not flagged</text>',
        f'<rect x="{lx + 92}" y="6" width="10" height="10" class="bar-flag"/>',
        f'<text x="{lx + 106}" y="15" class="tick">flagged ({flagged})</text>',
    ]


def histogram_svg(
    self_influence: np.ndarray,
    flagged: np.ndarray,
    *,
    bins: int = 40,
    width: int = 470,
    height: int = 260,
) -> str:
    """Inline SVG histogram of log10 self-influence, flagged examples stacked in red."""
    s = np.asarray(self_influence, dtype=np.float64).reshape(-1)
    flagged = np.asarray(flagged, dtype=bool).reshape(-1)
    positive = np.isfinite(s) & (s > 0)
    x = np.log10(s[positive])
    f = flagged[positive]
    skipped = int((~positive).sum())
    parts = [
        f'<svg class="hist" viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-label="Histogram of log10 self-influence">'
    ]
    if x.size == 0:
        parts.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="muted">'
            "no positive self-influence values</text></svg>"
        )
        return "".join(parts)
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    all_counts, _ = np.histogram(x, bins=edges)
    flag_counts, _ = np.histogram(x[f], bins=edges)
    ymax = max(int(all_counts.max()), 1)
    ystep = max(1, int(_nice_step(ymax, 4)))
    plot = _Plot(width, height, lo, hi, int(math.ceil(ymax / ystep) * ystep))
    parts += _y_grid(plot, ystep) + _x_ticks(plot) + _bars(plot, all_counts, flag_counts, bins)
    parts += _axes_and_legend(plot, int(f.sum()))
    parts.append("</svg>")
    if skipped:
        parts.append(f'<p class="muted small">{skipped} examples with self-influence ≤ 0 are not shown.</p>')
    return "".join(parts)


__all__ = ["histogram_svg"]
