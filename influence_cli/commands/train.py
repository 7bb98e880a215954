"""`infl train`: train the model (or verify the checkpoint) and print its accuracy."""

from __future__ import annotations

import time
from typing import List, Optional

import typer
from rich.markup import escape

from influence_cli.commands import command
from influence_cli.commands.common import ConfigOption, SetOption, model_line, open_session
from influence_cli.terminal import err


@command("train")
def train(
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    retrain: bool = typer.Option(False, "--retrain", help="Train again even if a valid checkpoint exists."),
) -> None:
    """Train the model (or verify the stored/user checkpoint) and print its accuracy."""
    from influence_cli.app import ensure_model

    session = open_session(config, set_)
    start = time.perf_counter()
    state = ensure_model(session, retrain=retrain)
    where = session.config.model.checkpoint or str(session.run.checkpoint)
    err.print(model_line(state), highlight=False)
    err.print(f"checkpoint: {escape(where)} ({time.perf_counter() - start:.1f} s)", highlight=False)
