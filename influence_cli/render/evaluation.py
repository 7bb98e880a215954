"""``infl evaluate``'s tables: label-noise detection and the linear datamodeling score.

Each function prints one result dict of :mod:`influence_cli.evaluation` (the same dict
that is written to evaluation.json / lds.json) on a rich console; nothing is computed here.
"""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

__all__ = ["fmt", "fmt_seconds", "render_detection_table", "render_lds_table", "render_tuning_table", "render_evaluation"]

_DETECTION_COLUMNS = (
    ("AUROC", "auroc"),
    ("AP", "average_precision"),
    ("P@k", "precision_at_k"),
    ("R@5%", "recall_at_5pct"),
    ("R@10%", "recall_at_10pct"),
    ("R@20%", "recall_at_20pct"),
)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "—"
    return f"{float(value):.{digits}f}"


def fmt_seconds(value: Any) -> str:
    if value is None:
        return "—"
    value = float(value)
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 10:
        return f"{value:.2f} s"
    if value < 600:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def render_evaluation(part: str, result: dict[str, Any], console: Any) -> None:
    """One part of ``run_evaluate``'s result: "noise_detection", "lds" or "damping_tuning"."""
    renderers = {"noise_detection": render_detection_table, "lds": render_lds_table, "damping_tuning": render_tuning_table}
    renderers[part](result, console)


def render_tuning_table(result: dict[str, Any], console: Any) -> None:
    """The damping grid: held-out LDS per factor, the best marked."""
    title = (
        f"Damping tuning — {result['config']}, {result['strategy']}: LDS on the last {result['test_rows']} test rows, "
        f"{result['subsets']} subsets"
    )
    table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold", title_style="bold")
    for header in ("damping_factor", "LDS (mean)", "± stderr", "rows", "time"):
        table.add_column(header, justify="right")
    for point in result["grid"]:
        best = point["damping_factor"] == result["best_factor"]
        cells = [f"{point['damping_factor']:g}", fmt(point.get("mean")), fmt(point.get("stderr")),
                 str(point.get("rows", "—")), fmt_seconds(point.get("seconds"))]
        table.add_row(*cells, style="bold" if best else None)
    console.print(table)
    console.print(
        f"best: damping_factor {result['best_factor']:g} (LDS {fmt(result['best_lds'])}) → {escape(result['file'])}; "
        "used by every command with influence.damping: tuned",
        highlight=False,
    )


def _print_skipped(skipped: list[tuple[str, Any]], console: Any) -> None:
    for name, reason in skipped:
        console.print(f"[yellow]{escape(name)} skipped:[/] {escape(str(reason))}", highlight=False)


def render_detection_table(result: dict[str, Any], console: Any) -> None:
    """Print the detection result as a rich table (one row per ranking, chance last)."""
    noise = result["noise"]
    title = (
        f"Label-noise detection — {result['config']}: {100 * noise['fraction']:g} % {noise['kind']} noise, "
        f"{result['flipped']} of {result['examples']} training labels flipped (k = {result['k']})"
    )
    table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold", title_style="bold", pad_edge=False)
    table.add_column("ranking", no_wrap=True)
    for header, _key in _DETECTION_COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    skipped, notes = [], []
    previous_type = None
    for name, entry in result["rankings"].items():
        if previous_type is not None and entry.get("type") != previous_type:
            table.add_section()
        previous_type = entry.get("type")
        if entry.get("same_as"):
            notes.append(f"{name} = self-influence with {entry['same_as']} (‖g_i‖², P = I)")
        if "skipped" in entry:
            skipped.append((name, entry["skipped"]))
            table.add_row(escape(name), "[yellow]skipped[/]", *["—"] * (len(_DETECTION_COLUMNS) - 1), "—")
            continue
        cells = [fmt(entry.get(key)) for _h, key in _DETECTION_COLUMNS]
        table.add_row(escape(name), *cells, fmt_seconds(entry.get("seconds")))
    chance = result.get("chance", {})
    table.add_section()
    table.add_row("random (chance)", *[fmt(chance.get(key)) for _h, key in _DETECTION_COLUMNS], "", style="dim")
    console.print(table)
    model = result.get("model", {})
    if model:
        console.print(
            f"noisy model: test accuracy {fmt(model.get('test_accuracy'))}, "
            f"memorised {fmt(100 * (model.get('flipped_memorised') or 0), 1)} % of the flipped labels; "
            f"time = fitting the factors + scoring all {result['examples']} examples",
            highlight=False,
        )
    for note in notes:
        console.print(escape(note), highlight=False)
    default, loss = result.get("default"), result["rankings"].get("loss", {})
    if default and "average_precision" in default:
        verdict = "≥" if (default["average_precision"] or 0) >= (loss.get("average_precision") or 0) else "<"
        console.print(
            f"default flag ranking: {escape(default['ranking'])} (strategy {escape(default['strategy'])}, audit.score "
            f"{escape(default['score'])}): AP {fmt(default['average_precision'])} {verdict} training loss AP "
            f"{fmt(loss.get('average_precision'))}",
            highlight=False,
        )
    _print_skipped(skipped, console)


def render_lds_table(result: dict[str, Any], console: Any) -> None:
    """Print the LDS result as a rich table (one row per strategy)."""
    title = (
        f"Linear datamodeling score — {result['config']}: {result['test_rows']} test rows ({result['measurement']}), "
        f"{result['subsets']} subsets of {result['subset_size']}/{result['examples']}"
        + (f", {result['seeds']} seeds each" if result.get("seeds", 1) > 1 else "")
    )
    table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold", title_style="bold")
    for header, justify in (("strategy", "left"), ("LDS (mean)", "right"), ("± stderr", "right"),
                            ("rows", "right"), ("fit", "right"), ("scores", "right")):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    skipped = []
    for name, entry in result["strategies"].items():
        if "skipped" in entry:
            skipped.append((name, entry["skipped"]))
            table.add_row(escape(name), "[yellow]skipped[/]", "—", "—", "—", "—")
            continue
        table.add_row(
            escape(name), fmt(entry.get("mean")), fmt(entry.get("stderr")), str(entry.get("rows", "—")),
            fmt_seconds(entry.get("fit_seconds")), fmt_seconds(entry.get("score_seconds")),
        )
    console.print(table)
    rt = result["retraining"]
    console.print(
        f"retraining: {rt['models']} models ({rt['trained_now']} trained now in {fmt_seconds(rt['seconds_now'])}, "
        f"{rt['reused']} reused); total retraining time {fmt_seconds(rt['seconds_total'])}",
        highlight=False,
    )
    _print_skipped(skipped, console)
