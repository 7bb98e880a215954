"""`infl report`: the self-contained HTML gallery of the top suspects."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.markup import escape

from influence_cli.commands import command
from influence_cli.commands.common import (
    ConfigOption, SetOption, StrategyOption, check_strategy, open_session,
)
from influence_cli.terminal import err


@command("report")
def report(
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    top: int = typer.Option(50, "--top", "-n", min=1, help="Suspects shown as cards in the gallery."),
    strategy: Optional[str] = StrategyOption,
) -> None:
    """Write runs/<name>/report.html: a self-contained gallery of the top suspects."""
    from influence_cli.app import run_report

    session = open_session(config, set_)
    path, si = run_report(session, strategy=check_strategy(strategy), top=top)
    err.print(f"report: {escape(str(path))} ({si.summary['run']['flagged']} flagged of {si.summary['run']['examples']})")
