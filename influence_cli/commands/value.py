"""`infl value`: which training examples help or hurt a whole set of rows."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from influence_cli.commands import command
from influence_cli.commands.common import (
    ConfigOption, SetOption, StrategyOption, check_choice, check_strategy, model_line, open_session,
)
from influence_cli.terminal import err


@command("value")
def value(
    query_csv: Optional[Path] = typer.Argument(
        None, metavar="QUERY_CSV",
        help="Rows whose loss to explain, in `infl score`'s formats: an 'index' column (rows of the test split), "
        "'path' (image files, relative to the CSV) or the feature columns; optional 'label' and 'id'. "
        "Default: the split given by --split.",
        show_default=False,
    ),
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    split: str = typer.Option("test", "--split", help="Query set when no CSV is given: the 'test' or 'train' split."),
    measurement: str = typer.Option(
        "loss", "--measurement", "-m", help="What the set's value measures: 'loss' (of the label) or 'margin'."
    ),
    only_misclassified: bool = typer.Option(
        False, "--only-misclassified", help="Keep only the labelled query rows the model gets wrong (the failures)."
    ),
    top: int = typer.Option(20, "--top", "-n", min=1, help="Rows in each table (most harmful, most helpful)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Also write the ranking CSV here ('-' for stdout); runs/<name>/value.csv is always written."
    ),
    strategy: Optional[str] = StrategyOption,
) -> None:
    """Rank every training example by its influence on a whole set of rows (a validation split, a list of failures).

    value_i = Σ_t g_tᵀ(H + λI)⁻¹g_i over the set: negative = up-weighting i raises the set's
    loss (harmful, a candidate to drop), positive = helpful. Costs about one pass over the
    training set. Writes runs/<name>/value.csv (rank, index, id, label, predicted, value,
    share of the total absolute influence), most harmful first.
    """
    from influence_cli.app.value import SPLITS, run_value
    from influence_cli.render.value import render_value_tables, value_summary
    from influence_cli.run import check_output_file

    check_choice("--measurement", measurement, ("loss", "margin"))
    check_choice("--split", split, SPLITS)
    if out is not None and str(out) != "-":
        check_output_file(out, "--out", "value.csv")
    session = open_session(config, set_)
    result = run_value(
        session, query_csv, split=split, measurement=measurement, strategy=check_strategy(strategy),
        only_misclassified=only_misclassified, out=out,
    )
    if not session.dist.is_main:
        return
    err.print(model_line(result.model_state), highlight=False)
    render_value_tables(result.table, err, set_name=result.queries.name, top=top)
    err.print(value_summary(result.table, result.queries.name, len(result.queries), result.seconds, result.path),
              highlight=False)
    if out is not None and str(out) == "-":
        result.table.to_csv(sys.stdout, index=False, lineterminator="\n")
