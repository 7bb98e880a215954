"""`infl fix`: relabel or remove flagged training examples by an influence step, without retraining."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from influence_cli.commands import command
from influence_cli.commands.common import (
    ConfigOption, SetOption, StrategyOption, check_choice, check_strategy, open_session,
)
from influence_cli.terminal import err


@command("fix")
def fix_command(
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    action: str = typer.Option("relabel", "--action", "-a", help="relabel: give the examples their new labels; "
                               "remove: drop them from the training set."),
    from_file: Optional[Path] = typer.Option(
        None, "--from", metavar="FILE.csv", help="CSV of the examples to fix: an 'id' column and, for relabel, a "
        "'new_label' column (a class name or index; without it, 'suggested_label'), e.g. mislabels.csv after a "
        "person edited it."),
    flagged: bool = typer.Option(False, "--flagged", help="Fix the flagged rows of runs/<name>/mislabels.csv "
                                 "(relabel: each to its suggested_label); the default when --from is not given."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="CHECKPOINT",
                                       help="Write the corrected checkpoint here (default runs/<name>/fixed.safetensors)."),
    verify: bool = typer.Option(False, "--verify", help="Also retrain from scratch on the corrected data (same recipe "
                                "and seed) and compare: test accuracy, prediction agreement, parameter distance."),
    finetune_steps: int = typer.Option(0, "--finetune-steps", min=0, help="After the influence step, this many "
                                       "optimizer steps of the training recipe on the corrected data (0: none)."),
    strategy: Optional[str] = StrategyOption,
) -> None:
    """Correct the trained model for flagged or listed examples without retraining.

    One Newton step from the fitted model: remove θ' = θ + (1/n)·P·Σ∇ℓ_i, relabel
    θ' = θ − (1/n)·P·Σ(∇ℓ(x_i, y'_i) − ∇ℓ(x_i, y_i)), with P = (H + λI)⁻¹ of the chosen
    strategy, on the tracked layers only. The step is halved (up to 4 times) while the
    training objective on the corrected data gets worse. Writes the corrected checkpoint,
    runs/<name>/label_overrides.csv (relabel; point data.label_overrides at it to train on
    the corrected labels) and runs/<name>/fix.json.
    """
    from influence_cli.app.fix import run_fix
    from influence_cli.errors import InflError
    from influence_cli.render.fixing import render_fix
    from influence_cli.run import check_output_file

    check_choice("--action", action, ("relabel", "remove"))
    if flagged and from_file is not None:
        raise InflError("--flagged and --from: give one of them")
    if out is not None:
        check_output_file(out, "--out", "fixed.safetensors")
    session = open_session(config, set_)
    result = run_fix(session, action=action, from_file=from_file, out=out, strategy=check_strategy(strategy),
                     verify=verify, finetune_steps=finetune_steps)
    render_fix(result.summary, err)
    written = [result.checkpoint] + ([result.overrides] if result.overrides else []) + [result.json_path]
    err.print("→ " + ", ".join(escape(str(p)) for p in written), highlight=False)
    if result.overrides is not None:
        err.print(f"train on the corrected labels: --set data.label_overrides={escape(str(result.overrides))} "
                  f"--set name={escape(session.config.name)}-fixed", highlight=False)
