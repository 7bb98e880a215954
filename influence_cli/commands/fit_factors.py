"""`infl fit-factors`: fit and store the curvature factors of a strategy."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.markup import escape

from influence_cli.commands import command
from influence_cli.commands.common import (
    ConfigOption, SetOption, ShardOption, StrategyOption, check_strategy, model_line,
    open_session, parse_shard_option,
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

    session = open_session(config, set_)
    from influence_cli.app.choice import resolve_strategy

    strategy = resolve_strategy(session, check_strategy(strategy))
    shard_ = parse_shard_option(shard)
    if shard_ is not None:
        from influence_cli.app.shards import fit_factors_shard

        which, path = fit_factors_shard(session, *shard_, strategy=strategy)
        err.print(f"fit-factors shard {shard}: {which} sums → {escape(str(path))}; when every shard is done run `infl merge`", highlight=False)
        return
    state = ensure_model(session)
    err.print(model_line(state), highlight=False)
    fstate = ensure_factors(session, state, strategy, overwrite=overwrite)
    if fstate.reused:
        err.print(f"factors: reusing {escape(str(fstate.directory))} (still valid; --overwrite refits)", highlight=False)
    else:
        factors = fstate.factors
        layers = len(getattr(factors, "layers", None) or getattr(factors, "modules_info", {}))
        err.print(
            f"factors: fitted {strategy} for {layers} layers in {fstate.seconds:.1f} s → {escape(str(fstate.directory))}",
            highlight=False,
        )
