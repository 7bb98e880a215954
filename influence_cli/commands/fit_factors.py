"""`infl fit-factors`: fit and store the curvature factors of a strategy."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.markup import escape

from influence_cli.commands import command
from influence_cli.commands.common import (
    ConfigOption, SetOption, ShardOption, StrategyOption, check_strategy, model_line,
    open_session, say_shard_written,
)
from influence_cli.terminal import err


@command("fit-factors")
def fit_factors_command(
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    strategy: Optional[str] = StrategyOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="Refit even if factors exist (needed when they are stale)."),
    shard: Optional[str] = ShardOption,
) -> None:
    """Fit and store curvature factors (runs training first when needed).

    With --shard i/n: pass-1 sums of block i (ekfac: after `infl merge`, the same command
    again runs pass 2 in the merged bases).
    """
    from influence_cli.app import ensure_factors, ensure_model

    session = open_session(config, set_, shard)
    strategy = check_strategy(strategy) or session.config.influence.strategy
    check_strategy(strategy)
    if session.shard is not None:
        from influence_cli.app.shards import require_shardable

        require_shardable(strategy)  # before training a model for nothing
    state = ensure_model(session)
    if session.shard is None:
        err.print(model_line(state), highlight=False)
    fstate = ensure_factors(session, state, strategy, overwrite=overwrite)
    if session.shard is not None:
        say_shard_written(f"fit-factors shard {session.shard}: {fstate.which} sums", fstate)
    elif fstate.reused:
        err.print(f"factors: reusing {escape(str(fstate.directory))} (still valid; --overwrite refits)", highlight=False)
    else:
        factors = fstate.factors
        layers = len(getattr(factors, "layers", None) or getattr(factors, "modules_info", {}))
        err.print(
            f"factors: fitted {strategy} for {layers} layers in {fstate.seconds:.1f} s → {escape(str(fstate.directory))}",
            highlight=False,
        )
