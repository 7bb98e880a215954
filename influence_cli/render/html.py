"""The HTML report of the audit: one self-contained file, a gallery of the top suspects.

HTML: one file with inline CSS (:mod:`.css`), inline SVG (:mod:`.svg`) and ``data:`` PNG
thumbnails; it loads nothing from the network (a Content-Security-Policy forbids it) and
runs no script. Every user-provided string (ids, class names, paths, meta values) is
HTML-escaped. Written atomically through :func:`influence_cli.render.files.write_text`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

import numpy as np
import pandas as pd

from influence_cli.render.css import CSS
from influence_cli.render.files import write_text
from influence_cli.render.format import ARROW, format_prob, format_score, label_parts, shorten
from influence_cli.render.svg import histogram_svg

#: Thumbnails are upscaled (nearest-neighbour) until their shorter side is at least this.
MIN_THUMB_PX = 96
#: Larger images are shrunk so their longer side is at most this (keeps the HTML small).
MAX_THUMB_PX = 256
#: How many features of a table/vector example a card lists.
MAX_FEATURES = 12


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def image_to_png_data_uri(image: Any) -> str:
    """Encode an image array (H, W), (H, W, 1|3|4) or (1|3|4, H, W) as a ``data:`` PNG URI.

    uint8 is used as is; other dtypes are mapped to 0..255 (values in [0, 1] are scaled by
    255, anything else is min-max normalised). Small images are enlarged with
    nearest-neighbour until the shorter side is at least 96 px; large ones are shrunk so the
    longer side is at most 256 px.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB" if image.mode != "L" else "L")
    else:
        pil = Image.fromarray(_to_uint8_image(np.asarray(image)))
    width, height = pil.size
    if min(width, height) < MIN_THUMB_PX:
        factor = math.ceil(MIN_THUMB_PX / max(min(width, height), 1))
        if max(width, height) * factor <= 4 * MAX_THUMB_PX:
            pil = pil.resize((width * factor, height * factor), Image.Resampling.NEAREST)
    elif max(width, height) > MAX_THUMB_PX:
        pil.thumbnail((MAX_THUMB_PX, MAX_THUMB_PX), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _to_uint8_image(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels-first → channels-last
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or a.size == 0:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, 3), got {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == bool:
        return np.ascontiguousarray(a.astype(np.uint8) * 255)
    a = a.astype(np.float64)
    a = np.where(np.isfinite(a), a, 0.0)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif lo < 0.0 or hi > 255.0 or not np.all(np.equal(np.mod(a, 1), 0)):
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.ascontiguousarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _format_value(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def _feature_items(value: Any) -> tuple[list[tuple[str, str]], int]:
    """(first MAX_FEATURES (name, value) pairs, total count) of a table row or a vector."""
    if isinstance(value, pd.Series):
        value = value.to_dict()
    if isinstance(value, Mapping):
        items = list(value.items())
        return [(str(k), _format_value(v)) for k, v in items[:MAX_FEATURES]], len(items)
    array = np.asarray(value).reshape(-1)
    return [(f"x[{i}]", _format_value(v)) for i, v in enumerate(array[:MAX_FEATURES].tolist())], int(array.size)



def _class_table_html(summary: Mapping[str, Any]) -> str:
    classes = list(summary.get("classes", []))
    max_share = max([c["flagged_fraction"] for c in classes] + [1e-12])
    rows = []
    for c in classes:
        bar = int(round(28 * c["flagged_fraction"] / max_share)) if c["flagged"] else 0
        rows.append(
            f'<tr><td class="name" title="{_e(c["name"])}">{_e(c["name"])}</td>'
            f'<td class="num">{int(c["examples"])}</td>'
            f'<td class="num">{int(c["flagged"])}</td>'
            f'<td class="num">{_e(format_prob(c["flagged_fraction"]))}</td>'
            f'<td class="bar"><span class="share" style="width:{bar}px"></span></td></tr>'
        )
    totals = summary.get("totals", {})
    rows.append(
        f'<tr><td><b>all</b></td><td class="num"><b>{int(totals.get("examples", 0))}</b></td>'
        f'<td class="num"><b>{int(totals.get("flagged", 0))}</b></td>'
        f'<td class="num"><b>{_e(format_prob(totals.get("flagged_fraction", 0.0)))}</b></td><td></td></tr>'
    )
    return (
        '<div class="scroll"><table class="data"><thead><tr><th>Class</th><th class="num">Examples</th>'
        '<th class="num">Flagged</th><th class="num">Share</th><th></th></tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table></div>"
    )


def _pairs_table_html(summary: Mapping[str, Any]) -> str:
    pairs = list(summary.get("pairs", []))
    if not pairs:
        return '<p class="muted">No flagged examples.</p>'
    rows = "".join(
        f'<tr><td class="name"><span class="given">{_e(p["given"])}</span>'
        f'<span class="arrow">{ARROW}</span><span class="sugg">{_e(p["suggested"])}</span></td>'
        f'<td class="num">{int(p["count"])}</td></tr>'
        for p in pairs
    )
    return (
        '<table class="data"><thead><tr><th>Given → suggested</th><th class="num">Count</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )


def _card_preview(index: int, display: Callable[[int], Any], kind: str, alt: str) -> str:
    try:
        value = display(index)
        if value is None:
            raise ValueError("no preview")
        if kind == "image":
            uri = image_to_png_data_uri(value)
            return f'<div class="thumb"><img src="{uri}" alt="{_e(alt)}"></div>'
        items, total = _feature_items(value)
    except Exception as exc:  # a broken preview must not lose the whole report
        return f'<div class="thumb none">preview unavailable<br>{_e(type(exc).__name__)}: {_e(exc)}</div>'
    rows = "".join(f'<tr><th title="{_e(k)}">{_e(k)}</th><td title="{_e(v)}">{_e(v)}</td></tr>' for k, v in items)
    more = f'<div class="more">+ {total - len(items)} more</div>' if total > len(items) else ""
    return f'<div class="feats"><table class="kv">{rows}</table>{more}</div>'


def _card_html(row: Mapping[str, Any], display: Callable[[int], Any], kind: str) -> str:
    given, suggested = label_parts(row)
    flagged = bool(row["flagged"])
    full_id = str(row["id"])
    preview = _card_preview(int(row["index"]), display, kind, alt=f"example {full_id}")
    if flagged:
        labels = (
            f'<span class="given">{_e(given)}</span><span class="arrow">{ARROW}</span>'
            f'<span class="sugg">{_e(suggested or given)}</span>'
        )
        title = f"given {given} → suggested {suggested or given}"
    else:
        labels = f"<span>{_e(given)}</span>"
        title = f"given {given}"
    badge = '<span class="badge">FLAGGED</span>' if flagged else ""
    body = (
        '<div class="body">'
        f'<div class="head"><span class="rank">#{int(row["rank"])}</span>{badge}</div>'
        f'<div class="id" title="{_e(full_id)}"><span dir="ltr">{_e(shorten(full_id, 120))}</span></div>'
        f'<div class="labels" title="{_e(title)}">{labels}</div>'
        f'<div class="nums"><span>P(given) <b>{_e(format_prob(row["label_prob"]))}</b></span>'
        f'<span>SI <b>{_e(format_score(row["self_influence"]))}</b></span></div>'
        "</div>"
    )
    # Images lead the card; for table rows the label line comes first, then the features.
    inner = preview + body if kind == "image" else body + preview
    return f'<article class="card{" flagged" if flagged else ""}">{inner}</article>'


def _stats_html(df: pd.DataFrame, summary: Mapping[str, Any]) -> str:
    n = len(df)
    flagged = int(df["flagged"].sum()) if n else 0
    totals = summary.get("totals", {})
    stats = [
        ("Training examples", f"{n:,}", ""),
        ("Flagged", f"{flagged:,}", "flag"),
        ("Flagged share", format_prob(flagged / n if n else 0.0), "flag"),
        ("Classes", f"{int(totals.get('classes', len(summary.get('classes', []))))}", ""),
    ]
    return "".join(
        f'<div class="stat {cls}"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
        for k, v, cls in stats
    )


def _meta_html(meta: Mapping[str, Any]) -> str:
    if not meta:
        return ""
    return (
        '<dl class="meta">'
        + "".join(
            f'<div><dt>{_e(k)}</dt><dd title="{_e(_format_value(v))}">{_e(_format_value(v))}</dd></div>'
            for k, v in meta.items()
        )
        + "</dl>"
    )


_DOCUMENT = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="generator" content="infl">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<main>
<header>
<h1>{title}</h1>
<p class="sub">Training examples ranked by self-influence — how much the model had to bend to fit each one.
High-ranked examples whose given label the model disagrees with are flagged as likely mislabelled.</p>
<div class="stats">{stats}</div>
{meta}
</header>
<section class="row">
<div class="panel"><h2>Self-influence distribution</h2>{histogram}</div>
<div class="panel"><h2>Flagged per class</h2>{classes}</div>
<div class="panel"><h2>Given → suggested</h2>{pairs}</div>
</section>
<section>
<h2>Top {shown} most self-influential examples</h2>
<p class="legend">{shown_flagged} of these are flagged (red border). Labels read
<span class="given">given</span><span class="arrow">{arrow}</span><span class="sugg">suggested</span>;
P(given) is the model's probability of the given label; SI is the raw self-influence.</p>
<div class="gallery">{cards}</div>
</section>
{sections}<footer>Generated by infl on {generated} · self-contained file, no network access.</footer>
</main>
</body>
</html>
"""


def write_html_report(
    path: str | os.PathLike,
    df: pd.DataFrame,
    summary: Mapping[str, Any],
    *,
    title: str,
    display: Callable[[int], Any],
    kind: Literal["image", "table", "vector"],
    top: int = 50,
    meta: Optional[Mapping[str, Any]] = None,
    sections: str = "",
) -> Path:
    """Write one self-contained HTML report of the audit (atomically); returns the path.

    ``display(index)`` gives the preview of training example ``index``: for ``kind ==
    "image"`` an image array (uint8 (H, W) or (H, W, 3)); for ``"table"``/``"vector"`` a
    mapping feature → value or a 1-D array. ``meta`` is shown in the header (dataset,
    strategy, time, ...). The top ``top`` rows of the ranking become cards. ``sections``:
    finished HTML of further sections (e.g. `infl value`'s gallery), placed before the footer.
    """
    if kind not in ("image", "table", "vector"):
        raise ValueError(f"write_html_report: kind must be image, table or vector, got {kind!r}")
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    shown = df.head(max(int(top), 0))
    document = _DOCUMENT.format(
        title=_e(title),
        css=CSS.replace("%CARD%", str(170 if kind == "image" else 230)),
        stats=_stats_html(df, summary),
        meta=_meta_html(dict(meta or {})),
        histogram=histogram_svg(df["self_influence"].to_numpy(dtype=np.float64), df["flagged"].to_numpy(dtype=bool)),
        classes=_class_table_html(summary),
        pairs=_pairs_table_html(summary),
        shown=len(shown),
        shown_flagged=int(shown["flagged"].sum()) if len(shown) else 0,
        arrow=ARROW,
        cards="".join(_card_html(row, display, kind) for row in shown.to_dict("records")),
        generated=_e(generated),
        sections=sections,
    )
    return write_text(path, document)


__all__ = ["histogram_svg", "image_to_png_data_uri", "write_html_report"]
