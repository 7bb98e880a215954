"""Rich tables of the audit: the self-influence ranking, the class summary, the score table."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import pandas as pd
from rich import box
from rich.columns import Columns
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from influence_cli.render.format import (
    ARROW,
    FLAG_MARK,
    MAX_ID_CHARS,
    format_prob,
    format_score,
    label_parts,
    shorten,
    shorten_end,
)


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


def render_self_influence_table(
    df: pd.DataFrame,
    top: int,
    console: Console,
    title: str = "Most self-influential training examples",
    caption: Optional[str] = None,
    regression: bool = False,
) -> None:
    """Print the top ``top`` rows of a ranking as a rich table (flagged rows highlighted).
    ``regression``: the label column shows target → prediction and P(given) the loss.

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
    label_header = f"Target {ARROW} predicted" if regression else f"Given {ARROW} suggested"
    table.add_column(label_header, no_wrap=True, overflow="ellipsis", max_width=max(2 * name_width + 3, len(label_header)))
    table.add_column("Loss" if regression else "P(given)", justify="right", no_wrap=True, min_width=8)
    table.add_column("Self-influence", justify="right", no_wrap=True, min_width=14)
    table.add_column("Flag", justify="center", no_wrap=True, min_width=4)
    for row in rows:
        given, suggested = label_parts(row)
        flagged = bool(row["flagged"])
        given_text = escape(shorten_end(given, name_width))
        if regression:
            label = f"{given_text} {ARROW} {escape(shorten_end(str(row['predicted_name']), name_width))}"
        elif flagged:
            label = f"[red]{given_text}[/] {ARROW} [bold green]{escape(shorten_end(suggested or given, name_width))}[/]"
        else:
            label = given_text
        table.add_row(
            str(int(row["rank"])),
            escape(shorten(row["id"], id_width)),
            label,
            format_score(row["loss"]) if regression else format_prob(row["label_prob"]),
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
    # regression rankings have no given → suggested pairs: an outlier has no better label
    console.print(Columns([per_class, pair_table], padding=(0, 4)) if pairs else per_class)


def _fmt(value: float) -> str:
    return f"{value:+.3g}"


def render_score_table(table: pd.DataFrame, console: Console, *, title: str, per_role: int = 3, max_rows: int = 20) -> None:
    """Each test example with its label and prediction and its top proponents and opponents."""
    view = Table(title=title, show_lines=True, title_justify="left")
    view.add_column("test id", overflow="fold", max_width=28)
    view.add_column("label → predicted", no_wrap=True)
    view.add_column(f"top {per_role} proponents (id, label, score)", overflow="fold")
    view.add_column(f"top {per_role} opponents (id, label, score)", overflow="fold")
    shown = 0
    for test_id, rows in table.groupby("test_id", sort=False):
        if shown >= max_rows:
            break
        shown += 1
        first = rows.iloc[0]
        given = first["test_label"] if first["test_label"] != "" else "(none)"
        cells = []
        for role, colour in (("proponent", "green"), ("opponent", "red")):
            part = rows[rows["role"] == role].head(per_role)
            lines = [
                f"{escape(str(r.train_id))} [dim]{escape(str(r.train_label))}[/dim] [{colour}]{_fmt(r.influence)}[/{colour}]"
                for r in part.itertuples(index=False)
            ]
            cells.append("\n".join(lines) or "[dim]none[/dim]")
        test_cell = escape(str(test_id))
        if "test_index" in rows.columns and str(first["test_index"]) != "":
            test_cell += f"\n[dim]index {escape(str(first['test_index']))}[/dim]"  # the row the user wrote
        view.add_row(test_cell, f"{escape(str(given))} → {escape(str(first['test_predicted']))}", *cells)
    console.print(view)
    remaining = table["test_id"].nunique() - shown
    if remaining > 0:
        console.print(f"[dim]… {remaining} more test rows in the CSV[/dim]")


__all__ = ["render_class_summary", "render_score_table", "render_self_influence_table"]
