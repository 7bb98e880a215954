"""`infl self-influence`: rank training examples by self-influence and flag likely mislabels."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from influence_cli.commands import command
from influence_cli.commands.common import (
    ConfigOption, SetOption, ShardOption, StrategyOption, check_strategy, model_line,
    open_session, say_shard_written,
)
from influence_cli.terminal import err


@command("self-influence")
def self_influence_command(
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    top: Optional[int] = typer.Option(None, "--top", "-n", min=1, help="Rows in the table (default audit.top, 20)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Also write the full ranking CSV here ('-' for stdout)."
    ),
    strategy: Optional[str] = StrategyOption,
    shard: Optional[str] = ShardOption,
) -> None:
    """Rank training examples by self-influence and flag likely mislabels.

    Writes runs/<name>/self_influence.csv (all examples, highest first), mislabels.csv
    (flagged rows) and summary.json, and prints the top rows. Self-influence is
    g_iᵀ(H + λI)⁻¹g_i ≥ 0: how much the model had to bend to fit example i.
    """
    from influence_cli.app import run_self_influence
    from influence_cli.render.files import write_csv
    from influence_cli.render.tables import render_class_summary, render_self_influence_table
    from influence_cli.run import check_output_file

    if out is not None and str(out) != "-":
        check_output_file(out, "--out")
    session = open_session(config, set_, shard)
    result = run_self_influence(session, check_strategy(strategy))
    if session.shard is not None:
        say_shard_written(f"self-influence shard {session.shard}", result)
        return
    if not session.dist.is_main:
        return
    cfg = session.config
    err.print(model_line(result.model_state), highlight=False)
    title = f"{cfg.name}: most self-influential training examples ({result.summary['run']['strategy']})"
    render_self_influence_table(result.table, top or cfg.audit.top, err, title, regression=cfg.task == "regression")
    render_class_summary(result.summary, err)
    run_info = result.summary["run"]
    err.print(
        f"{run_info['examples']} examples, [bold]{run_info['flagged']} flagged[/bold], "
        f"{result.seconds:.1f} s → {escape(str(session.run.self_influence_csv))}, {escape(str(session.run.mislabels_csv))}",
        highlight=False,
    )
    if out is not None:
        if str(out) == "-":
            result.table.to_csv(sys.stdout, index=False)
        else:
            write_csv(result.table, out)
