"""The outputs of `infl check` once the gate has decided: JUnit XML, Markdown, the GitHub
step summary, the baseline file and the terminal lines."""

from __future__ import annotations

import html
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import pandas as pd
from rich.console import Console
from rich.markup import escape

from influence_cli.audit.check import CheckResult
from influence_cli.render.files import write_csv, write_text
from influence_cli.render.tables import render_self_influence_table


def _offender_lines(result: CheckResult, limit: int = 50) -> list[str]:
    lines = []
    for row in result.offenders.head(limit).itertuples(index=False):
        lines.append(
            f"rank {row.rank}: id {row.id}, given {row.label_name}, model prefers {row.predicted_name} "
            f"(p={row.label_prob:.3f}, self-influence {row.self_influence:.4g})"
        )
    if len(result.offenders) > limit:
        lines.append(f"... and {len(result.offenders) - limit} more (see check.csv)")
    return lines


def junit_xml(result: CheckResult, suite_name: str = "infl check") -> str:
    """One test case per threshold; a failure carries the offenders."""
    failures = sum(not t.passed for t in result.thresholds)
    suite = ET.Element(
        "testsuite", name=suite_name, tests=str(len(result.thresholds)), failures=str(failures), errors="0"
    )
    for threshold in result.thresholds:
        case = ET.SubElement(suite, "testcase", classname="infl.check", name=threshold.name)
        if not threshold.passed:
            failure = ET.SubElement(case, "failure", message=threshold.describe(), type="DataQuality")
            failure.text = "\n".join(_offender_lines(result))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)


def describe(result: CheckResult) -> str:
    """One summary line: examples, flagged and, with a baseline, how many it accepted."""
    text = f"{result.total} examples, {result.flagged_total} flagged"
    if result.baseline_used:
        text += f": {result.baseline_matched} accepted in the baseline, {len(result.offenders)} new (counted)"
    return text


def markdown_summary(result: CheckResult, name: str, top: int = 10) -> str:
    """A short Markdown report for GITHUB_STEP_SUMMARY or a file."""
    status = "✅ passed" if result.passed else "❌ failed"
    lines = [
        f"## infl check — {html.escape(name)}: {status}",
        "",
        f"- examples: {result.total}",
        f"- flagged: {result.flagged_total}"
        + (f" ({result.baseline_matched} accepted in the baseline, {len(result.offenders)} new)" if result.baseline_used else ""),
    ]
    for threshold in result.thresholds:
        lines.append(f"- {'✅' if threshold.passed else '❌'} `{threshold.name}`: {threshold.describe()}")
    if len(result.offenders):
        lines += ["", "| rank | id | given | model prefers | P(given) | self-influence |", "|---:|---|---|---|---:|---:|"]
        for row in result.offenders.head(top).itertuples(index=False):
            cells = [str(row.rank), str(row.id), str(row.label_name), str(row.predicted_name)]
            cells = [html.escape(c).replace("|", "\\|") for c in cells]
            lines.append(f"| {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {row.label_prob:.3f} | {row.self_influence:.4g} |")
        if len(result.offenders) > top:
            lines.append(f"\n… and {len(result.offenders) - top} more in `check.csv`.")
    return "\n".join(lines) + "\n"


def write_ci_outputs(result: CheckResult, name: str, *, junit: Optional[Path], markdown: Optional[Path]) -> None:
    """Write the JUnit XML and Markdown files asked for, and append the Markdown summary to
    ``$GITHUB_STEP_SUMMARY`` when that is set."""
    if junit is not None:
        write_text(junit, junit_xml(result, f"infl check {name}"))
    summary_md = markdown_summary(result, name)
    if markdown is not None:
        write_text(markdown, summary_md)
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as handle:
            handle.write(summary_md)


def write_baseline(table: pd.DataFrame, path: Path, console: Console) -> None:
    """Accept every currently flagged example: write them to ``path`` (a later --baseline)."""
    write_csv(table[table["flagged"]], path)
    console.print(f"baseline: {int(table['flagged'].sum())} flagged examples → {escape(str(path))}", soft_wrap=True)


def render_check(result: CheckResult, name: str, thresholds_from: str, check_csv: Path, console: Console) -> None:
    """The offenders table, one pass/FAIL line per threshold and the summary line."""
    if len(result.offenders):
        caption = f"{result.flagged_total} of {result.total} training examples flagged"
        if result.baseline_used:
            caption += f", {result.baseline_matched} accepted in the baseline"
        title = f"{name}: flagged examples" + (" not in the baseline" if result.baseline_used else "")
        render_self_influence_table(result.offenders, 20, console, title, caption=caption)
    for threshold in result.thresholds:
        mark = "[green]pass[/green]" if threshold.passed else "[bold red]FAIL[/bold red]"
        console.print(f"{mark} {threshold.name}: {threshold.describe()} ({thresholds_from})", highlight=False)
    console.print(f"{describe(result)} → {escape(str(check_csv))}", highlight=False, soft_wrap=True)


__all__ = ["describe", "junit_xml", "markdown_summary", "render_check", "write_baseline", "write_ci_outputs"]
