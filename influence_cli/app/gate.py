"""`infl check` and `infl report`: the self-influence audit plus thresholds, or the HTML gallery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from influence_cli import __version__
from influence_cli.app.scores import SelfInfluenceResult, run_self_influence
from influence_cli.app.session import Session


@dataclass
class CheckOutcome:
    result: Any  # audit.check.CheckResult
    self_influence: SelfInfluenceResult
    thresholds_from: str


DEFAULT_MAX_FLAGGED_FRACTION = 0.02


def run_check(
    session: Session,
    *,
    max_flagged_fraction: Optional[float] = None,
    max_flagged: Optional[int] = None,
    baseline: Optional[Any] = None,
    strategy: Optional[str] = None,
) -> CheckOutcome:
    """Self-influence audit plus the thresholds; writes runs/<name>/check.csv."""
    from pathlib import Path

    from influence_cli.audit.check import evaluate_check, read_baseline
    from influence_cli.render.files import write_csv

    config = session.config
    baseline_ids = read_baseline(Path(baseline)) if baseline else None
    if baseline and config.data.source == "table" and config.data.id_column is None:
        session.reporter.warn(
            "--baseline: data.id_column is not set, so table ids are row numbers; inserting or deleting a row "
            "shifts every id and the baseline stops matching: add an id column and set data.id_column"
        )
    if max_flagged_fraction is None and max_flagged is None:
        max_flagged_fraction = config.audit.check.max_flagged_fraction
        max_flagged = config.audit.check.max_flagged
        source = "audit.check"
        if max_flagged_fraction is None and max_flagged is None:
            max_flagged_fraction = DEFAULT_MAX_FLAGGED_FRACTION
            source = "default"
    else:
        source = "command line"
    si = run_self_influence(session, strategy)
    result = evaluate_check(
        si.table, max_flagged_fraction=max_flagged_fraction, max_flagged=max_flagged, baseline_ids=baseline_ids
    )
    if session.dist.is_main:
        write_csv(result.offenders, session.run.root / "check.csv")
    return CheckOutcome(result, si, source)


def run_report(session: Session, *, strategy: Optional[str] = None, top: int = 50, path: Optional[Any] = None) -> Any:
    """Write runs/<name>/report.html (or ``path``) from a fresh (or reused) self-influence audit."""
    from influence_cli.render.html import write_html_report

    si = run_self_influence(session, strategy)
    data = session.data()
    path = session.run.report_html if path is None else path
    if not session.dist.is_main:
        return path, si
    meta = {
        "config": session.config.name,
        "data source": session.config.data.source,
        "strategy": si.summary["run"]["strategy"],
        "training examples": si.summary["run"]["examples"],
        "flagged": si.summary["run"]["flagged"],
        "test accuracy": f"{si.model_state.test_accuracy:.3f}",
        "infl version": __version__,
    }
    write_html_report(
        path,
        si.table,
        si.summary,
        title=f"infl audit: {session.config.name}",
        display=data.train.display,
        kind=data.kind,
        top=top,
        meta=meta,
        sections=value_sections(session, data),
    )
    return path, si


def value_sections(session: Session, data: Any) -> str:
    """The "most harmful for <set>" gallery when `infl value` wrote value.csv (else "")."""
    import pandas as pd

    from influence_cli.errors import DataError
    from influence_cli.render.value import harmful_gallery_html
    from influence_cli.run import read_json

    path = session.run.root / "value.csv"
    if not path.is_file():
        return ""
    try:
        table = pd.read_csv(path, dtype={"id": str, "label": str, "predicted": str}, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read it ({exc}); rerun `infl value` or delete the file") from None
    if "value" not in table.columns or "index" not in table.columns or table["index"].max() >= len(data.train):
        raise DataError(f"{path}: not a value ranking of this run's training set; rerun `infl value` or delete the file")
    info = read_json(session.run.root / "value.json") or {}
    return harmful_gallery_html(table, str(info.get("set", "the query set")), data.train.display, data.kind)
