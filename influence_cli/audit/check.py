"""The CI data-quality gate: thresholds on flagged examples, baselines, JUnit and Markdown.

Pure functions over the self-influence table, so the CLI stays thin and tests can feed
hand-made tables. An accepted baseline (an earlier mislabels.csv / check.csv) lists ids that
no longer count, so a team can adopt the gate on an existing dataset and fail only on new
suspects.
"""

from __future__ import annotations

import html
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from influence_cli.errors import DataError


@dataclass
class Threshold:
    name: str
    limit: float
    value: float
    passed: bool

    def describe(self) -> str:
        if self.name == "max_flagged_fraction":
            return f"flagged fraction {self.value:.4f} {'≤' if self.passed else '>'} {self.limit:.4f}"
        return f"flagged count {int(self.value)} {'≤' if self.passed else '>'} {int(self.limit)}"


@dataclass
class CheckResult:
    total: int
    flagged_total: int
    baseline_matched: int
    offenders: pd.DataFrame
    thresholds: list[Threshold] = field(default_factory=list)
    baseline_used: bool = False  # a --baseline was given (even an empty one)

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.thresholds)

    @property
    def offender_fraction(self) -> float:
        return len(self.offenders) / self.total if self.total else 0.0


def read_baseline(path: Path) -> set[str]:
    """Ids listed in an accepted earlier mislabels.csv or check.csv."""
    if not path.is_file():
        raise DataError(f"{path}: baseline file not found (write one with --write-baseline)")
    try:
        frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot read baseline CSV: {str(exc).splitlines()[0]}") from None
    if "id" not in frame.columns:
        raise DataError(f"{path}: baseline CSV has no 'id' column (use a mislabels.csv or check.csv written by infl)")
    return set(frame["id"].astype(str))


def evaluate_check(
    table: pd.DataFrame,
    *,
    max_flagged_fraction: Optional[float],
    max_flagged: Optional[int],
    baseline_ids: Optional[set[str]] = None,
) -> CheckResult:
    """Count flagged examples not in the baseline and compare with each threshold."""
    flagged = table[table["flagged"].astype(bool)]
    in_baseline = flagged["id"].astype(str).isin(baseline_ids or set())
    offenders = flagged[~in_baseline].reset_index(drop=True)
    result = CheckResult(len(table), len(flagged), int(in_baseline.sum()), offenders, baseline_used=baseline_ids is not None)
    if max_flagged_fraction is not None:
        value = result.offender_fraction
        result.thresholds.append(Threshold("max_flagged_fraction", max_flagged_fraction, value, value <= max_flagged_fraction))
    if max_flagged is not None:
        value = len(offenders)
        result.thresholds.append(Threshold("max_flagged", max_flagged, value, value <= max_flagged))
    return result


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


def summary_dict(result: CheckResult) -> dict[str, Any]:
    return {
        "passed": result.passed,
        "examples": result.total,
        "flagged": result.flagged_total,
        "baseline_matched": result.baseline_matched,
        "baseline_used": result.baseline_used,
        "offenders": len(result.offenders),
        "thresholds": [t.__dict__ for t in result.thresholds],
    }
