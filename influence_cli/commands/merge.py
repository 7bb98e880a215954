"""`infl merge`: combine `--shard i/n` partial results into the normal outputs."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.markup import escape

from influence_cli.commands import command
from influence_cli.commands.common import ConfigOption, SetOption, open_session
from influence_cli.errors import InflError
from influence_cli.terminal import err


@command("merge")
def merge(
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    stage: Optional[List[str]] = typer.Option(
        None, "--stage", metavar="STAGE", help="Merge only this stage (factors-<strategy>, self-influence-<strategy>, score-<stem>); "
        "default: every stage with shard files under runs/<name>/shards/.",
    ),
) -> None:
    """Combine `--shard i/n` partial results into the normal outputs.

    Refuses (exit 2, one line) when a shard is missing, was made for another config or
    checkpoint, or the shards do not cover the training set exactly once.
    """
    from influence_cli.app.merge import merge_stage, shard_stages

    session = open_session(config, set_)
    stages = list(stage or shard_stages(session))
    if not stages:
        raise InflError(f"{session.run.root / 'shards'}: no shards to merge; run a command with --shard i/n first")
    for name in stages:
        done = merge_stage(session, name)
        outputs = ", ".join(escape(str(o)) for o in done["outputs"])
        err.print(f"merge {done['stage']}: {done['shards']} shards → {outputs}", highlight=False)
        if done.get("next"):
            err.print(done["next"], highlight=False)
