"""`infl score`: the training examples behind each prediction of a test CSV."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from influence_cli.commands import command
from influence_cli.commands.common import (
    ConfigOption, SetOption, ShardOption, StrategyOption, check_choice, check_strategy,
    open_session, say_shard_written,
)
from influence_cli.errors import InflError
from influence_cli.terminal import err


@command("score")
def score(
    test_csv: Path = typer.Argument(
        ...,
        metavar="TEST_CSV",
        help="CSV of test rows: an 'index' column (rows of the test split), 'path' (image files, relative to the CSV) "
        "or the feature columns of a table; optional 'label' and 'id' columns.",
        show_default=False,
    ),
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    top: int = typer.Option(10, "--top", "-n", min=1, help="Proponents and opponents kept per test row."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="CSV to write (default runs/<name>/scores/<stem>.csv; '-' for stdout)."
    ),
    strategy: Optional[str] = StrategyOption,
    measurement: str = typer.Option(
        "loss", "--measurement", "-m", help="What to explain: 'loss' (of the label) or 'margin' (logit of the label minus the others)."
    ),
    matrix: Optional[Path] = typer.Option(
        None, "--matrix", help="Also write the full test × train score matrix (safetensors, with row and column ids)."
    ),
    shard: Optional[str] = ShardOption,
    query_rank: Optional[int] = typer.Option(
        None, "--query-rank", min=0,
        help="Approximate: truncate each layer's preconditioned test gradient to rank K (faster on wide layers; "
        "0 = exact). Same as --set influence.query_rank=K.",
        show_default=False,
    ),
) -> None:
    """Explain predictions: the training examples that pushed each test row towards its label (proponents) and away (opponents).

    score(train i, test t) = g_tᵀ(H + λI)⁻¹g_i; positive = proponent. Rows without a label are
    measured against the model's prediction.
    """
    from influence_cli.app import run_score
    from influence_cli.run import check_output_file

    check_choice("--measurement", measurement, ("loss", "margin"))
    for path, option, example in ((out, "--out", "scores.csv"), (matrix, "--matrix", "scores.safetensors")):
        if path is not None and str(path) != "-":
            check_output_file(path, option, example)
    if query_rank is not None:
        set_ = [*(set_ or []), f"influence.query_rank={query_rank}"]
    session = open_session(config, set_, shard)
    if session.shard is not None and matrix is not None:
        raise InflError("--matrix cannot be combined with --shard (shards keep the top N only)")
    result = run_score(
        session, test_csv, strategy=check_strategy(strategy), matrix_path=matrix, top=top, measurement=measurement, out=out
    )
    if session.shard is not None:
        say_shard_written(f"score shard {session.shard}", result)
    elif session.dist.is_main:
        show_scores(session, result, test_csv, out, matrix)


def show_scores(session: Any, result: Any, test_csv: Path, out: Optional[Path], matrix: Optional[Path]) -> None:
    """The score table and summary line on stderr; the CSV on stdout for `--out -`."""
    from influence_cli.app.explain import scores_target
    from influence_cli.render.tables import render_score_table

    render_score_table(result.table, err, title=f"{session.config.name}: training examples behind each prediction")
    unlabeled = int((result.queries.labels < 0).sum())
    if unlabeled:
        err.print(f"{unlabeled} row(s) had no label: measured against the model's prediction (test_label is empty).")
    target = scores_target(session, test_csv, out)
    extra = f", matrix → {escape(str(matrix))}" if matrix else ""
    err.print(
        f"{len(result.queries.ids)} test rows scored against {len(session.data().train)} training examples "
        f"in {result.seconds:.1f} s → {escape(str(target))}{extra}",
        highlight=False,
    )
    rank = session.config.influence.query_rank
    if rank:
        err.print(f"approximate scores: influence.query_rank = {rank} (rank-{rank} test gradients; 0 = exact)", highlight=False)
    if out is not None and str(out) == "-":
        result.table.to_csv(sys.stdout, index=False)
