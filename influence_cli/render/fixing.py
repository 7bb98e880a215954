"""Rich tables of `infl fix` (one correction) and `infl evaluate --fix` (the fixing curve)."""

from __future__ import annotations

from typing import Any, Mapping

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from influence_cli.render.format import ARROW


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100.0 * float(value):.1f}%"


def _num(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def _change(before: Any, after: Any, fmt: Any) -> str:
    return f"{fmt(before)} {ARROW} {fmt(after)}"


def render_fix(summary: Mapping[str, Any], console: Console) -> None:
    """Before → after of one correction, and the retrained reference when verified."""
    table = Table(title=escape(f"{summary['name']}: infl fix --action {summary['action']} ({summary['strategy']})"),
                  box=box.SIMPLE_HEAVY, show_header=True)
    table.add_column("")
    table.add_column(f"before {ARROW} after", justify="right")
    table.add_row("examples changed", f"{summary['examples_changed']} of {summary['train_examples']}")
    halved = f" ({summary['halvings']} halvings)" if summary["halvings"] else ""
    table.add_row("step scale", f"{summary['step_scale']:g}{halved}")
    for split, label in (("train", "train (corrected labels)"), ("test", "test")):
        part = summary[split]
        table.add_row(f"{label} accuracy", _change(part["before"]["accuracy"], part["after"]["accuracy"], _pct))
        table.add_row(f"{label} loss", _change(part["before"]["loss"], part["after"]["loss"], _num))
    own = summary["fixed_examples_loss"]
    table.add_row("fixed examples' loss (mean)", _change(own["before"], own["after"], _num))
    table.add_row("  change: predicted / measured", f"{_num(own['predicted_change'])} / {_num(own['measured_change'])}")
    verify = summary.get("verify")
    if verify:
        table.add_row("retrained: test accuracy", _pct(verify["test"]["accuracy"]))
        table.add_row("test predictions agreeing with retrained",
                      _change(verify["original_agreement"], verify["agreement"], _pct))
        table.add_row("‖θ'−θ_r‖ / ‖θ−θ_r‖", _num(verify["relative_distance"], 3))
    seconds = summary["seconds"]
    cost = f"{seconds['correction']:.2f} s"
    if "retraining" in seconds:
        cost += f" (retraining {seconds['retraining']:.2f} s)"
    table.add_row("correction time", cost)
    console.print(table)
    if summary["untracked_parameters"]:
        fixed = ", ".join(summary["untracked_parameters"])
        console.print(f"not tracked, left unchanged: {escape(fixed)}", highlight=False)


def render_fixing_curve(result: Mapping[str, Any], console: Console) -> None:
    """Flips found and test accuracy after retraining / after the correction, per fraction."""
    ref, cost = result["reference"], result["cost"]
    per = ", ".join(f"{escape(name)} {_num(c['correction_seconds'], 2)} s" for name, c in cost.get("by_ranking", {}).items())
    caption = (f"clean {_pct(ref['clean_accuracy'])}, noisy {_pct(ref['noisy_accuracy'])}; one correction "
               f"{_num(cost['correction_seconds'], 2)} s on average ({per}) vs one retraining "
               f"{_num(cost['retraining_seconds'], 2)} s (ratio {_num(cost['ratio'], 3)})")
    table = Table(title=escape(f"{result['name']}: fixing curve ({result['noise']['kind']} noise "
                               f"{_pct(result['noise']['fraction'])})"), caption=caption, box=box.SIMPLE_HEAVY)
    for name, justify in (("ranking", "left"), ("checked", "right"), ("flips found", "right"),
                          ("retrained acc", "right"), ("corrected acc", "right"), ("scale", "right")):
        table.add_column(name, justify=justify)
    for ranking, rows in result["rankings"].items():
        for row in rows:
            table.add_row(escape(ranking), _pct(row["fraction"]), _pct(row["flips_found"]),
                          _pct(row["retrained_accuracy"]), _pct(row["corrected_accuracy"]), _num(row["step_scale"], 3))
    console.print(table)
