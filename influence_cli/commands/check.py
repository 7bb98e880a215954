"""`infl check`: the data-quality gate for CI."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from influence_cli.commands import command
from influence_cli.commands.common import (
    ConfigOption, SetOption, StrategyOption, check_strategy, open_session,
)
from influence_cli.terminal import err


@command("check")
def check(
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    max_flagged_fraction: Optional[float] = typer.Option(
        None, "--max-flagged-fraction", min=0.0, max=1.0,
        help="Fail when more than this share of examples is flagged (default audit.check, else 0.02).",
    ),
    max_flagged: Optional[int] = typer.Option(None, "--max-flagged", min=0, help="Fail when more than N examples are flagged."),
    baseline: Optional[Path] = typer.Option(
        None, "--baseline", help="Accepted earlier mislabels.csv/check.csv: its ids do not count."
    ),
    write_baseline: Optional[Path] = typer.Option(
        None, "--write-baseline", help="Write every currently flagged example to this CSV, to accept them."
    ),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write a JUnit XML report (one test case per threshold)."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write a Markdown summary here."),
    strategy: Optional[str] = StrategyOption,
) -> None:
    """Data-quality gate for CI: exit 0 within thresholds, 1 when exceeded, 2 on bad input.

    Flagged examples follow audit.flag (see README). With --baseline only new suspects count.
    Appends a Markdown summary to $GITHUB_STEP_SUMMARY when that is set.
    """
    from influence_cli.app import run_check
    from influence_cli.render.ci import render_check, write_baseline as write_baseline_csv, write_ci_outputs

    session = open_session(config, set_)
    outcome = run_check(
        session,
        max_flagged_fraction=max_flagged_fraction,
        max_flagged=max_flagged,
        baseline=baseline,
        strategy=check_strategy(strategy),
    )
    result = outcome.result
    name = session.config.name
    if not session.dist.is_main:
        if not result.passed:
            raise typer.Exit(1)
        return
    if write_baseline is not None:
        write_baseline_csv(outcome.self_influence.table, write_baseline, err)
    write_ci_outputs(result, name, junit=junit, markdown=markdown)
    render_check(result, name, outcome.thresholds_from, session.run.root / "check.csv", err)
    if not result.passed:
        raise typer.Exit(1)
