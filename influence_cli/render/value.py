"""`infl value`'s presentation: the terminal tables of the most harmful and most helpful
training examples, and the report's "most harmful for <set>" gallery."""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd
from rich import box
from rich.columns import Columns
from rich.markup import escape
from rich.table import Table

from influence_cli.render.format import MAX_ID_CHARS, format_prob, shorten


def _value_table(rows: pd.DataFrame, title: str, colour: str) -> Table:
    table = Table(title=escape(title), box=box.SIMPLE_HEAVY, header_style="bold", title_style="bold")
    table.add_column("Rank", justify="right", no_wrap=True)
    table.add_column("ID", no_wrap=True, overflow="ellipsis", max_width=MAX_ID_CHARS)
    table.add_column("Label → predicted", no_wrap=True, overflow="ellipsis", max_width=30)
    table.add_column("Value", justify="right", no_wrap=True)
    table.add_column("Share", justify="right", no_wrap=True)
    for row in rows.itertuples(index=False):
        wrong = str(row.label) != str(row.predicted)
        labels = escape(str(row.label)) + (f" → [bold]{escape(str(row.predicted))}[/]" if wrong else "")
        table.add_row(
            str(int(row.rank)), escape(shorten(row.id)), labels, f"[{colour}]{float(row.value):+.3g}[/]",
            format_prob(abs(float(row.share))),
        )
    return table


def render_value_tables(table: pd.DataFrame, console: Any, *, set_name: str, top: int = 20) -> None:
    """The ``top`` most harmful (most negative value) and most helpful examples, side by side."""
    harmful = table[table["value"] < 0].head(top)
    helpful = table[table["value"] > 0].iloc[::-1].head(top)
    parts = []
    for rows, title, colour in ((harmful, f"most harmful for {set_name}", "red"),
                                (helpful, f"most helpful for {set_name}", "green")):
        if len(rows):
            parts.append(_value_table(rows, title, colour))
        else:
            console.print(f"[dim]no training example is {title.split(' for ')[0].split()[-1]} for {escape(set_name)}[/dim]")
    if parts:
        console.print(Columns(parts, padding=(0, 4)))


def value_summary(table: pd.DataFrame, set_name: str, rows: int, seconds: float, path: Any) -> str:
    """The one-line summary: how much of the influence the harmful examples carry."""
    values = table["value"].to_numpy(dtype=float)
    harmful = int((values < 0).sum())
    share = float(-table.loc[table["value"] < 0, "share"].sum()) if harmful else 0.0
    return (
        f"{len(values)} training examples valued on {rows} rows of {escape(set_name)}: {harmful} harmful "
        f"({format_prob(share)} of the total influence), total {values.sum():+.3g}, {seconds:.1f} s → {escape(str(path))}"
    )


def harmful_gallery_html(table: pd.DataFrame, set_name: str, display: Callable[[int], Any], kind: str,
                         top: int = 24) -> str:
    """The report section of the ``top`` most harmful examples for the query set."""
    from influence_cli.render.html import _card_preview, _e

    rows = table[table["value"] < 0].head(max(int(top), 0))
    cards = []
    for row in rows.to_dict("records"):
        preview = _card_preview(int(row["index"]), display, kind, alt=f"example {row['id']}")
        wrong = str(row["label"]) != str(row["predicted"])
        labels = f"<span>{_e(row['label'])}</span>" + (
            f'<span class="arrow">→</span><span class="given">{_e(row["predicted"])}</span>' if wrong else ""
        )
        body = (
            '<div class="body">'
            f'<div class="head"><span class="rank">#{int(row["rank"])}</span></div>'
            f'<div class="id" title="{_e(row["id"])}"><span dir="ltr">{_e(shorten(row["id"], 120))}</span></div>'
            f'<div class="labels" title="given {_e(row["label"])}, predicted {_e(row["predicted"])}">{labels}</div>'
            f'<div class="nums"><span>value <b>{float(row["value"]):+.3g}</b></span>'
            f'<span>share <b>{_e(format_prob(abs(float(row["share"]))))}</b></span></div>'
            "</div>"
        )
        inner = preview + body if kind == "image" else body + preview
        cards.append(f'<article class="card harmful">{inner}</article>')
    legend = (
        "Training examples whose up-weighting raises the loss of the whole set most (negative value = "
        "Σ over the set of g<sub>t</sub>ᵀ(H + λI)⁻¹g<sub>i</sub>); share is each example's part of the total "
        "absolute influence. Labels read given → predicted when the model disagrees."
    )
    if not cards:
        return f'<section class="value"><h2>Most harmful for {_e(set_name)}</h2><p class="legend">No training example is harmful for this set.</p></section>'
    return (
        f'<section class="value"><h2>Most harmful for {_e(set_name)}</h2><p class="legend">{legend}</p>'
        f'<div class="gallery">{"".join(cards)}</div></section>'
    )


_METHOD_NAMES = {"most_harmful": "most harmful", "random": "random", "highest_loss": "highest loss"}


def _mean_std(entry: dict[str, Any], key: str, percent: bool = False, spread: bool = True) -> str:
    cell = entry.get(key) or {}
    mean, std = cell.get("mean"), cell.get("std")
    if mean is None:
        return "—"
    scale = 100.0 if percent else 1.0
    text = f"{scale * mean:.1f}" if percent else f"{mean:.3f}"
    if std and spread:
        text += f"±{scale * std:.1f}" if percent else f"±{std:.3f}"
    return text


def render_value_evaluation(result: dict[str, Any], console: Any) -> None:
    """``infl evaluate --value``'s table: each K and method next to the full-data model."""
    seeds = len(result.get("seeds", [])) or 1
    noise = result.get("noise")
    title = (
        f"Dropping training examples — {result['config']}: value on {result['validation_rows']} validation rows, "
        f"measured on {result['heldout_rows']} held-out rows"
        + (f", mean (held-out: ± std) over {seeds} seeds" if seeds > 1 else "")
    )
    table = Table(title=escape(title), box=box.SIMPLE_HEAD, header_style="bold", title_style="bold", pad_edge=False)
    for header in ("K", "dropped", "val\nloss", "val\nacc%", "held-out\nloss", "held-out\nacc%"):
        table.add_column(header, justify="left" if header == "dropped" else "right", no_wrap=True)
    if noise:
        table.add_column("flipped\ndropped", justify="right", no_wrap=True)

    def row(k: str, name: str, entry: dict[str, Any], style: Any = None) -> None:
        cells = [k, name, _mean_std(entry, "validation_loss", spread=False),
                 _mean_std(entry, "validation_accuracy", True, spread=False),
                 _mean_std(entry, "heldout_loss"), _mean_std(entry, "heldout_accuracy", True)]
        if noise:
            cells.append(str(entry.get("flipped_dropped", "—")))
        table.add_row(*cells, style=style)

    row("0", "none (full)", result["full"], "dim")
    for removal in result["removals"]:
        table.add_section()
        k = f"{removal['k']} ({100 * removal['fraction']:.0f}%)"
        best = min(METHODS_ORDER, key=lambda m: (removal[m]["heldout_loss"]["mean"] or float("inf")))
        for method in METHODS_ORDER:
            row(k if method == METHODS_ORDER[0] else "", _METHOD_NAMES[method], removal[method],
                "bold" if method == best else None)
    console.print(table)
    rt = result["retraining"]
    extra = f"; flipped dropped: how many of the dropped examples had a flipped label ({noise['flipped']} in all)" if noise else ""
    console.print(
        f"strategy {escape(result['strategy'])}; bold = lowest held-out loss at that K{extra}; retrainings: "
        f"{rt['trained_now']} now, {rt['reused']} reused",
        highlight=False,
    )


METHODS_ORDER = ("most_harmful", "random", "highest_loss")

__all__ = ["harmful_gallery_html", "render_value_evaluation", "render_value_tables", "value_summary"]
