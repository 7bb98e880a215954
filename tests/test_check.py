"""The CI gate: its pure logic (thresholds, baselines) and its JUnit XML and Markdown outputs."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest

from influence_cli.audit.check import evaluate_check, read_baseline
from influence_cli.errors import DataError
from influence_cli.render.ci import junit_xml, markdown_summary


def table(flags: list[bool]) -> pd.DataFrame:
    n = len(flags)
    return pd.DataFrame(
        {
            "rank": range(1, n + 1),
            "index": range(n),
            "id": [f"ex{i}" for i in range(n)],
            "label": [0] * n,
            "label_name": ["cat"] * n,
            "predicted": [1] * n,
            "predicted_name": ["dog|<b>"] * n,
            "label_prob": [0.1] * n,
            "loss": [2.3] * n,
            "self_influence": [float(n - i) for i in range(n)],
            "flagged": flags,
            "suggested_label": ["dog" if f else "" for f in flags],
        }
    )


def test_thresholds_and_baseline() -> None:
    frame = table([True, True, False, True] + [False] * 96)
    result = evaluate_check(frame, max_flagged_fraction=0.02, max_flagged=None)
    assert not result.passed
    assert result.offender_fraction == pytest.approx(0.03)
    assert list(result.offenders["id"]) == ["ex0", "ex1", "ex3"]
    ok = evaluate_check(frame, max_flagged_fraction=0.02, max_flagged=None, baseline_ids={"ex0", "ex3"})
    assert ok.passed and ok.baseline_matched == 2 and list(ok.offenders["id"]) == ["ex1"]
    counted = evaluate_check(frame, max_flagged_fraction=None, max_flagged=2)
    assert not counted.passed and counted.thresholds[0].value == 3
    assert evaluate_check(frame, max_flagged_fraction=None, max_flagged=3).passed


def test_junit_parses_with_failures() -> None:
    frame = table([True, False, True, False])
    result = evaluate_check(frame, max_flagged_fraction=0.25, max_flagged=5)
    root = ET.fromstring(junit_xml(result))
    assert root.tag == "testsuite" and root.get("tests") == "2" and root.get("failures") == "1"
    cases = {c.get("name"): c for c in root.findall("testcase")}
    failure = cases["max_flagged_fraction"].find("failure")
    assert failure is not None and "ex0" in failure.text and "ex2" in failure.text
    assert cases["max_flagged"].find("failure") is None


def test_markdown_escapes_and_lists() -> None:
    result = evaluate_check(table([True, False]), max_flagged_fraction=0.1, max_flagged=None)
    text = markdown_summary(result, "digits")
    assert "failed" in text and "ex0" in text
    assert "<b>" not in text and "dog\\|&lt;b&gt;" in text


def test_read_baseline(tmp_path: Path) -> None:
    path = tmp_path / "base.csv"
    table([True, False]).to_csv(path, index=False)
    assert read_baseline(path) == {"ex0", "ex1"}
    with pytest.raises(DataError, match="not found"):
        read_baseline(tmp_path / "none.csv")
    (tmp_path / "noid.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no 'id' column"):
        read_baseline(tmp_path / "noid.csv")


def test_describe_mentions_the_baseline_only_when_given() -> None:
    from influence_cli.render.ci import describe

    frame = table([True, True, False, True] + [False] * 96)
    plain = evaluate_check(frame, max_flagged_fraction=0.02, max_flagged=None)
    assert describe(plain) == "100 examples, 3 flagged"
    assert "baseline" not in markdown_summary(plain, "digits")
    based = evaluate_check(frame, max_flagged_fraction=0.02, max_flagged=None, baseline_ids={"ex0", "ex3"})
    assert describe(based) == "100 examples, 3 flagged: 2 accepted in the baseline, 1 new (counted)"
    assert "- flagged: 3 (2 accepted in the baseline, 1 new)" in markdown_summary(based, "digits")
    empty = evaluate_check(frame, max_flagged_fraction=0.02, max_flagged=None, baseline_ids=set())
    assert empty.baseline_used and describe(empty).endswith("0 accepted in the baseline, 3 new (counted)")
