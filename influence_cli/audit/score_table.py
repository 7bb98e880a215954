"""Terminal rendering of `infl score` results: one block per test row."""

from __future__ import annotations

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table


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
