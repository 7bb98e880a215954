"""The CI data-quality gate: thresholds on flagged examples and baselines (the decision only).

Pure functions over the self-influence table, so the CLI stays thin and tests can feed
hand-made tables; the JUnit XML, Markdown and terminal outputs of a decision are in
:mod:`influence_cli.render.ci`. An accepted baseline (an earlier mislabels.csv / check.csv) lists ids that
no longer count, so a team can adopt the gate on an existing dataset and fail only on new
suspects.
"""

from __future__ import annotations

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
