"""Writers and renderers of the audit: CSV/JSON files, rich tables, a self-contained HTML report.

Everything here is presentation: it receives the ranking frame built by
:func:`influence_cli.audit.ranking.build_ranking` (and the summary from
:func:`~influence_cli.audit.ranking.class_summary`) and writes or renders it.

File format choices
-------------------
* Every file is written atomically: to a temporary file in the destination folder, which
  is then moved over the destination with ``os.replace``. A reader never sees half a file,
  and an interrupted run leaves the previous file intact.
* CSV: UTF-8, ``\\n`` line endings, a header row, no index column. Floats are written with
  Python's shortest round-trip representation (``repr``), so reading a CSV back gives
  bit-identical float64 values; the raw self-influence is always kept (never rounded).
  Booleans are written as ``True``/``False`` (pandas' default; ``pandas.read_csv`` reads
  them back as booleans). ``suggested_label`` is empty for rows that are not flagged.
  Read a ranking back with :func:`read_ranking_csv`, which keeps ids such as ``NA`` or
  ``001`` as strings.
* JSON: UTF-8, indented by 2, numpy scalars/arrays converted to plain numbers/lists and
  non-finite floats written as ``null``.
* HTML: one file with inline CSS, inline SVG and ``data:`` PNG thumbnails; it loads
  nothing from the network (a Content-Security-Policy forbids it) and runs no script.
  Every user-provided string (ids, class names, paths, meta values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import html
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from rich import box
from rich.columns import Columns
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from influence_cli.audit.ranking import SELF_INFLUENCE_COLUMNS
from influence_cli.errors import DataError, output_error

ARROW = "→"
FLAG_MARK = "⚑"
#: Longest id shown in a terminal table or an HTML card (longer ids keep their tail).
MAX_ID_CHARS = 40
#: Thumbnails are upscaled (nearest-neighbour) until their shorter side is at least this.
MIN_THUMB_PX = 96
#: Larger images are shrunk so their longer side is at most this (keeps the HTML small).
MAX_THUMB_PX = 256
#: How many features of a table/vector example a card lists.
MAX_FEATURES = 12


# ============================================================================ atomic files


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def _atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file next to ``path``; on success move it over ``path``."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise output_error(exc.filename if exc.filename else target, exc) from None
    try:
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the result the mode a normal open() would.
        try:
            file_mode = target.stat().st_mode & 0o777
        except FileNotFoundError:
            file_mode = 0o666 & ~_UMASK
        os.chmod(tmp, file_mode)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        error = output_error(target, exc) if isinstance(exc, OSError) else None
        if error is None:
            raise
        raise error from None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with _atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a frame as CSV atomically: no index, repr floats, ``True``/``False`` booleans."""
    with _atomic_open(path, "w") as handle:
        df.to_csv(handle, index=False, lineterminator="\n")
    return Path(path)


def read_ranking_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``self_influence.csv``/``mislabels.csv`` back with the dtypes it was written with."""
    path = Path(path)
    text_columns = ["id", "label_name", "predicted_name", "suggested_label"]
    try:
        df = pd.read_csv(
            path,
            dtype={c: object for c in text_columns},
            keep_default_na=False,
            na_values={c: [] for c in text_columns},
        )
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read the ranking CSV: {exc}") from None
    if list(df.columns) != SELF_INFLUENCE_COLUMNS:
        raise DataError(
            f"{path}: unexpected columns {list(df.columns)}; expected {','.join(SELF_INFLUENCE_COLUMNS)} "
            "(delete the file and rerun `infl self-influence`)"
        )
    for column in text_columns:
        values = ["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in df[column].tolist()]
        df[column] = pd.Series(values, index=df.index, dtype=object)
    df["flagged"] = df["flagged"].map(_parse_bool).astype(bool)
    return df


def _parse_bool(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise DataError(f"flagged: expected True or False, got {value!r}")


def jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays → Python numbers/lists; NaN/inf → None; paths/dates → str."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (os.PathLike, _dt.date, _dt.datetime)):
        return str(obj)
    raise TypeError(f"write_json: cannot serialise {type(obj).__name__}")


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented UTF-8 JSON atomically (numpy values become plain numbers)."""
    text = json.dumps(jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


# ============================================================================ formatting


def format_score(value: float) -> str:
    """Self-influence with 3 significant digits in scientific notation (``1.23e+03``)."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2e}"


def format_prob(p: float) -> str:
    """A probability as a percentage with one decimal (``<0.1%`` for tiny ones)."""
    p = float(p)
    if not math.isfinite(p):
        return "n/a"
    if 0.0 < p < 0.0005:
        return "<0.1%"
    return f"{100.0 * p:.1f}%"


def shorten(text: str, limit: int = MAX_ID_CHARS) -> str:
    """Keep the tail of a long id (for paths, the file name is the informative part)."""
    text = str(text)
    if len(text) <= limit:
        return text
    return "…" + text[-(limit - 1):]


def _shorten_end(text: str, limit: int) -> str:
    """Cut a class name at the end (its beginning is the informative part)."""
    text = str(text)
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def _text_widths(rows: Sequence[Mapping[str, Any]], console_width: int) -> tuple[int, int]:
    """Widths of the id column and of one class name so the table fits the console."""
    # rank, P(given), self-influence, flag + per column 2 padding + 7 (invisible) box rules
    fixed = 4 + 8 + 14 + 4 + 6 * 2 + 7
    longest_id = max([len(str(r["id"])) for r in rows] + [2])
    longest_name = max([len(str(r["label_name"])) for r in rows] + [len(str(r["suggested_label"])) for r in rows] + [1])
    name_width = min(longest_name, 20)
    label_width = max(2 * name_width + 3, len(f"Given {ARROW} suggested"))
    id_width = min(longest_id, MAX_ID_CHARS, max(console_width - fixed - label_width, 10))
    if fixed + id_width + label_width > console_width:  # narrow console: squeeze the names too
        name_width = max(4, (console_width - fixed - id_width - 3) // 2)
    return max(id_width, 2), name_width


def _label_parts(row: Mapping[str, Any]) -> tuple[str, Optional[str]]:
    """(given, suggested or None) for a ranking row."""
    given = str(row["label_name"])
    suggested = str(row["suggested_label"]) if bool(row["flagged"]) else ""
    return given, (suggested if suggested else None)


# ============================================================================ terminal


def render_self_influence_table(
    df: pd.DataFrame,
    top: int,
    console: Console,
    title: str = "Most self-influential training examples",
    caption: Optional[str] = None,
) -> None:
    """Print the top ``top`` rows of a ranking as a rich table (flagged rows highlighted).

    The caption counts the flagged rows of ``df``, which must then be the whole training
    set; a table of some rows only (``infl check``'s offenders) passes its own ``caption``.
    """
    n = len(df)
    flagged_total = int(df["flagged"].sum()) if n else 0
    shown = df.head(max(int(top), 0))
    if caption is None:
        caption = f"{flagged_total} of {n} training examples flagged"
    table = Table(
        title=escape(str(title)),
        caption=f"{escape(caption)} · showing the top {len(shown)}",
        box=box.SIMPLE_HEAVY,
        header_style="bold",
        title_style="bold",
        expand=False,
    )
    rows = shown.to_dict("records")
    id_width, name_width = _text_widths(rows, console.width)
    # Fixed-width numeric columns; the id and label columns are sized to fit the console.
    table.add_column("Rank", justify="right", no_wrap=True, min_width=4)
    table.add_column("ID", no_wrap=True, overflow="ellipsis", width=id_width)
    label_header = f"Given {ARROW} suggested"
    table.add_column(label_header, no_wrap=True, overflow="ellipsis", max_width=max(2 * name_width + 3, len(label_header)))
    table.add_column("P(given)", justify="right", no_wrap=True, min_width=8)
    table.add_column("Self-influence", justify="right", no_wrap=True, min_width=14)
    table.add_column("Flag", justify="center", no_wrap=True, min_width=4)
    for row in rows:
        given, suggested = _label_parts(row)
        flagged = bool(row["flagged"])
        given_text = escape(_shorten_end(given, name_width))
        if flagged:
            label = f"[red]{given_text}[/] {ARROW} [bold green]{escape(_shorten_end(suggested or given, name_width))}[/]"
        else:
            label = given_text
        table.add_row(
            str(int(row["rank"])),
            escape(shorten(row["id"], id_width)),
            label,
            format_prob(row["label_prob"]),
            format_score(row["self_influence"]),
            f"[bold red]{FLAG_MARK}[/]" if flagged else "",
            style="bold" if flagged else None,
        )
    console.print(table)


def render_class_summary(summary: Mapping[str, Any], console: Console, max_classes: int = 20) -> None:
    """Print flagged counts per class and the most common given → suggested pairs."""
    totals = summary.get("totals", {})
    classes = list(summary.get("classes", []))
    pairs = list(summary.get("pairs", []))
    if not totals.get("flagged"):
        console.print(f"[green]No training examples flagged[/] (out of {int(totals.get('examples', 0))}).")
        return

    per_class = Table(title="Flagged per class", box=box.SIMPLE, header_style="bold", title_style="bold")
    per_class.add_column("Class", overflow="ellipsis", no_wrap=True, max_width=30)
    per_class.add_column("Examples", justify="right")
    per_class.add_column("Flagged", justify="right")
    per_class.add_column("Share", justify="right")
    shown = classes
    if len(classes) > max_classes:
        shown = sorted(classes, key=lambda c: (-c["flagged"], c["label"]))[:max_classes]
    for c in shown:
        per_class.add_row(
            escape(str(c["name"])),
            str(c["examples"]),
            f"[bold red]{c['flagged']}[/]" if c["flagged"] else "0",
            format_prob(c["flagged_fraction"]),
        )
    if len(classes) > len(shown):
        per_class.caption = f"{len(classes) - len(shown)} more classes not shown"
    per_class.add_section()
    per_class.add_row(
        "[bold]all[/]",
        str(totals.get("examples", 0)),
        f"[bold]{totals.get('flagged', 0)}[/]",
        format_prob(totals.get("flagged_fraction", 0.0)),
    )

    pair_table = Table(
        title=f"Most common given {ARROW} suggested", box=box.SIMPLE, header_style="bold", title_style="bold"
    )
    pair_table.add_column("Given", overflow="ellipsis", no_wrap=True, max_width=24)
    pair_table.add_column("", no_wrap=True)
    pair_table.add_column("Suggested", overflow="ellipsis", no_wrap=True, max_width=24)
    pair_table.add_column("Count", justify="right")
    for p in pairs:
        pair_table.add_row(
            f"[red]{escape(str(p['given']))}[/]", ARROW, f"[green]{escape(str(p['suggested']))}[/]", str(p["count"])
        )
    console.print(Columns([per_class, pair_table], padding=(0, 4)))


# ============================================================================ HTML pieces


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


def _nice_step(span: float, target: int = 5) -> float:
    if span <= 0:
        return 1.0
    raw = span / target
    power = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * power:
            return m * power
    return 10 * power


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
    left, right, top, bottom = 52, 16, 26, 46
    pw, ph = width - left - right, height - top - bottom
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
    ytop = int(math.ceil(ymax / ystep) * ystep)

    def px(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    def py(c: float) -> float:
        return top + ph - c / ytop * ph

    # grid + y ticks
    for c in range(0, ytop + 1, ystep):
        y = py(c)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="gl"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{c}</text>')
    # x ticks at nice log10 steps, labelled as powers of ten
    xstep = _nice_step(hi - lo, 6)
    xstep = max(xstep, 0.5) if hi - lo > 1 else xstep
    tick = math.ceil(lo / xstep) * xstep
    while tick <= hi + 1e-9:
        x0 = px(tick)
        parts.append(f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{top + ph}" y2="{top + ph + 5}" class="axis"/>')
        if abs(tick - round(tick)) < 1e-9:
            label = f'10<tspan dy="-6" font-size="9">{int(round(tick))}</tspan>'
        else:
            label = f"{10 ** tick:.2g}"
        parts.append(f'<text x="{x0:.1f}" y="{top + ph + 19}" text-anchor="middle" class="tick">{label}</text>')
        tick += xstep
    # bars
    bw = pw / bins
    for i in range(bins):
        total, fl = int(all_counts[i]), int(flag_counts[i])
        if total == 0:
            continue
        x0 = left + i * bw + 0.5
        w = max(bw - 1.0, 0.5)
        h_total = max(total / ytop * ph, 2.0)
        h_flag = max(fl / ytop * ph, 2.0) if fl else 0.0
        h_rest = max(h_total - h_flag, 0.0)
        y_rest = top + ph - h_total
        if h_rest > 0:
            parts.append(
                f'<rect x="{x0:.1f}" y="{y_rest:.1f}" width="{w:.1f}" height="{h_rest:.1f}" class="bar">'
                f"<title>{total - fl} not flagged</title></rect>"
            )
        if fl:
            parts.append(
                f'<rect x="{x0:.1f}" y="{top + ph - h_flag:.1f}" width="{w:.1f}" height="{h_flag:.1f}" '
                f'class="bar-flag"><title>{fl} flagged</title></rect>'
            )
    # axes + labels
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" class="axis"/>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" class="axis"/>')
    parts.append(
        f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" class="label">'
        "self-influence (log scale)</text>"
    )
    parts.append(
        f'<text transform="translate(13 {top + ph / 2}) rotate(-90)" text-anchor="middle" class="label">'
        "training examples</text>"
    )
    # legend
    lx = left + pw - 180
    parts.append(f'<rect x="{lx}" y="6" width="10" height="10" class="bar"/>')
    parts.append(f'<text x="{lx + 14}" y="15" class="tick">not flagged</text>')
    parts.append(f'<rect x="{lx + 92}" y="6" width="10" height="10" class="bar-flag"/>')
    parts.append(f'<text x="{lx + 106}" y="15" class="tick">flagged ({int(f.sum())})</text>')
    parts.append("</svg>")
    if skipped:
        parts.append(f'<p class="muted small">{skipped} examples with self-influence ≤ 0 are not shown.</p>')
    return "".join(parts)


_CSS = """
:root { --bg:#f5f6f8; --panel:#ffffff; --ink:#1f2933; --muted:#66727f; --line:#e3e7ec;
  --flag:#c62828; --flag-bg:#fff4f3; --ok:#2e7d32; --bar:#8da2b8; --accent:#3559a8; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 28px 40px; }
h1 { font-size: 24px; margin: 0 0 2px; letter-spacing: -0.01em; }
h2 { font-size: 15px; margin: 0 0 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.sub { color: var(--muted); margin: 0 0 18px; }
.stats { display:flex; flex-wrap:wrap; gap:12px; margin-bottom:14px; }
.stat { background:var(--panel); border:1px solid var(--line); border-radius:10px; padding:10px 16px; min-width:140px; }
.stat .v { font-size:22px; font-weight:650; }
.stat .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.stat.flag .v { color: var(--flag); }
dl.meta { display:grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap:4px 18px;
  margin:0 0 22px; padding:12px 16px; background:var(--panel); border:1px solid var(--line); border-radius:10px; }
dl.meta div { display:flex; gap:8px; min-width:0; }
dl.meta dt { color:var(--muted); white-space:nowrap; }
dl.meta dd { margin:0; font-weight:600; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.row { display:grid; grid-template-columns: minmax(0, 1.6fr) minmax(0, 1fr) minmax(0, 0.75fr); gap:18px;
  margin-bottom:26px; align-items:start; }
.panel { background:var(--panel); border:1px solid var(--line); border-radius:10px; padding:16px 18px; min-width:0; }
table.data { border-collapse:collapse; width:100%; font-variant-numeric: tabular-nums; }
table.data th { text-align:left; font-weight:600; color:var(--muted); font-size:12px; border-bottom:1px solid var(--line); padding:4px 5px; }
table.data td { padding:4px 5px; border-bottom:1px solid #f0f2f5; }
table.data td.num, table.data th.num { text-align:right; }
table.data td.name { max-width: 120px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.scroll { max-height: 520px; overflow:auto; }
td.bar { width:30px; padding-left:2px; padding-right:0; }
.share { display:inline-block; height:8px; background:var(--flag); border-radius:4px; vertical-align:middle; opacity:.8; }
.given { color: var(--flag); font-weight:600; }
.sugg { color: var(--ok); font-weight:600; }
.arrow { color: var(--muted); padding: 0 4px; }
svg.hist { display:block; }
svg .gl { stroke:#edf0f3; }
svg .axis { stroke:#9aa5b1; }
svg .tick { fill:var(--muted); font-size:11px; }
svg .label { fill:var(--ink); font-size:12px; }
svg .bar { fill:var(--bar); }
svg .bar-flag { fill:var(--flag); }
.muted { color:var(--muted); }
.small { font-size:12px; margin:6px 0 0; }
.legend { color:var(--muted); margin:-4px 0 14px; }
.badge { display:inline-block; font-size:10px; font-weight:700; letter-spacing:.06em; padding:2px 6px;
  border-radius:4px; background:var(--flag); color:#fff; }
.gallery { display:grid; grid-template-columns: repeat(auto-fill, minmax(%CARD%px, 1fr)); gap:14px; }
.card { background:var(--panel); border:1px solid var(--line); border-radius:10px; overflow:hidden;
  display:flex; flex-direction:column; min-width:0; }
.card.flagged { border-color:var(--flag); box-shadow:0 0 0 1px var(--flag); background:var(--flag-bg); }
.thumb { display:flex; align-items:center; justify-content:center; height:132px; background:#eef1f4; }
.card.flagged .thumb { background:#fbe3e1; }
.thumb img { max-width:100%; max-height:124px; image-rendering: pixelated; border-radius:3px; }
.thumb.none { color:var(--muted); font-size:12px; padding:8px; text-align:center; }
.feats { padding:6px 12px 10px; border-top:1px solid var(--line); }
table.kv { width:100%; border-collapse:collapse; font-size:12px; font-variant-numeric: tabular-nums; }
table.kv th { text-align:left; font-weight:400; color:var(--muted); padding:1px 6px 1px 0; max-width:120px;
  overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
table.kv td { text-align:right; padding:1px 0; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; max-width:110px; }
.more { color:var(--muted); font-size:11px; }
.body { padding:8px 12px 10px; display:flex; flex-direction:column; gap:3px; }
.head { display:flex; justify-content:space-between; align-items:center; }
.rank { font-weight:700; color:var(--accent); }
.id { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size:12px;
  color:var(--muted); overflow:hidden; text-overflow:ellipsis; white-space:nowrap; direction:rtl; text-align:left; }
.id span { unicode-bidi:isolate; }
.labels { font-size:15px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.nums { display:flex; justify-content:space-between; font-size:12px; color:var(--muted); font-variant-numeric: tabular-nums; }
.nums b { color:var(--ink); font-weight:600; }
footer { color:var(--muted); font-size:12px; margin-top:28px; text-align:center; }
@media (max-width: 1000px) { .row { grid-template-columns: 1fr 1fr; } .row > :first-child { grid-column: 1 / -1; } }
@media (max-width: 640px) { .row { grid-template-columns: 1fr; } }
"""


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
    given, suggested = _label_parts(row)
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
) -> Path:
    """Write one self-contained HTML report of the audit (atomically); returns the path.

    ``display(index)`` gives the preview of training example ``index``: for ``kind ==
    "image"`` an image array (uint8 (H, W) or (H, W, 3)); for ``"table"``/``"vector"`` a
    mapping feature → value or a 1-D array. ``meta`` is shown in the header (dataset,
    strategy, time, ...). The top ``top`` rows of the ranking become cards.
    """
    if kind not in ("image", "table", "vector"):
        raise ValueError(f"write_html_report: kind must be image, table or vector, got {kind!r}")
    meta = dict(meta or {})
    n = len(df)
    flagged = int(df["flagged"].sum()) if n else 0
    totals = summary.get("totals", {})
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()

    stats = [
        ("Training examples", f"{n:,}", ""),
        ("Flagged", f"{flagged:,}", "flag"),
        ("Flagged share", format_prob(flagged / n if n else 0.0), "flag"),
        ("Classes", f"{int(totals.get('classes', len(summary.get('classes', []))))}", ""),
    ]
    stats_html = "".join(
        f'<div class="stat {cls}"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
        for k, v, cls in stats
    )
    meta_html = ""
    if meta:
        meta_html = (
            '<dl class="meta">'
            + "".join(
                f'<div><dt>{_e(k)}</dt><dd title="{_e(_format_value(v))}">{_e(_format_value(v))}</dd></div>'
                for k, v in meta.items()
            )
            + "</dl>"
        )

    shown = df.head(max(int(top), 0))
    cards = "".join(_card_html(row, display, kind) for row in shown.to_dict("records"))
    shown_flagged = int(shown["flagged"].sum()) if len(shown) else 0
    card_px = 170 if kind == "image" else 230
    css = _CSS.replace("%CARD%", str(card_px))
    histogram = histogram_svg(
        df["self_influence"].to_numpy(dtype=np.float64), df["flagged"].to_numpy(dtype=bool)
    )

    document = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="generator" content="infl">
<title>{_e(title)}</title>
<style>{css}</style>
</head>
<body>
<main>
<header>
<h1>{_e(title)}</h1>
<p class="sub">Training examples ranked by self-influence — how much the model had to bend to fit each one.
High-ranked examples whose given label the model disagrees with are flagged as likely mislabelled.</p>
<div class="stats">{stats_html}</div>
{meta_html}
</header>
<section class="row">
<div class="panel"><h2>Self-influence distribution</h2>{histogram}</div>
<div class="panel"><h2>Flagged per class</h2>{_class_table_html(summary)}</div>
<div class="panel"><h2>Given → suggested</h2>{_pairs_table_html(summary)}</div>
</section>
<section>
<h2>Top {len(shown)} most self-influential examples</h2>
<p class="legend">{shown_flagged} of these are flagged (red border). Labels read
<span class="given">given</span><span class="arrow">{ARROW}</span><span class="sugg">suggested</span>;
P(given) is the model's probability of the given label; SI is the raw self-influence.</p>
<div class="gallery">{cards}</div>
</section>
<footer>Generated by infl on {_e(generated)} · self-contained file, no network access.</footer>
</main>
</body>
</html>
"""
    return atomic_write_text(path, document)


__all__ = [
    "atomic_write_text",
    "format_prob",
    "format_score",
    "histogram_svg",
    "image_to_png_data_uri",
    "read_ranking_csv",
    "render_class_summary",
    "render_self_influence_table",
    "shorten",
    "write_csv",
    "write_html_report",
    "write_json",
]
