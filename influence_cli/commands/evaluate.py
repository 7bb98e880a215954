"""`infl evaluate`: how far to trust the rankings (injected-noise detection and LDS)."""

from __future__ import annotations

import time
from typing import Any, List, Optional

import typer

from influence_cli.commands import command
from influence_cli.commands.common import (
    SLOW_STRATEGIES, ConfigOption, SetOption, check_choice, check_strategy, open_session,
)
from influence_cli.errors import InflError
from influence_cli.terminal import err


@command("evaluate")
def evaluate(
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    noise: Optional[float] = typer.Option(
        None, "--noise", min=0.0, max=1.0,
        help="Flip this share of training labels (seeded), retrain, and measure how well each ranking finds them "
        "(AUROC, average precision, precision@k, recall in the top 5/10/20 %). Default 0.1 when --lds is not given.",
    ),
    kind: str = typer.Option("uniform", "--kind", help="Label noise: uniform (random other class) or class_conditional (a fixed confusion)."),
    fix: bool = typer.Option(
        False, "--fix", help="Fixing curve instead of detection: check 5..30 % of the training set in each ranking's "
        "order, let an oracle restore the flipped labels found, and report flips found and test accuracy after "
        "retraining and after the influence relabel correction (runs/<name>-noise<F>-<kind>/fixing.json, fixing.html).",
    ),
    lds: bool = typer.Option(False, "--lds", help="Linear datamodeling score: retrain on random subsets and correlate with predicted effects."),
    subsets: int = typer.Option(100, "--subsets", min=2, help="LDS: number of random training subsets (each retraining is cached)."),
    fraction: float = typer.Option(0.5, "--fraction", min=0.01, max=0.99, help="LDS: share of the training set in each subset."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="LDS and --value: retrainings per subset / per K (averaged)."),
    test_rows: int = typer.Option(100, "--test-rows", min=1, help="LDS: the first N rows of the test split."),
    measurement: str = typer.Option("loss", "--measurement", "-m", help="LDS: loss or margin."),
    tune_damping: bool = typer.Option(
        False, "--tune-damping",
        help="Score each damping factor of --grid on a cheap held-out LDS (--tune-subsets retrainings, the last "
        "--test-rows test rows), write the best to runs/<name>/damping.json and use it wherever influence.damping: "
        "tuned. Tunes the one -s strategy, else influence.strategy.",
    ),
    grid: str = typer.Option("0.01,0.03,0.1,0.3,1,3,10", "--grid", help="--tune-damping: comma-separated damping factors."),
    tune_subsets: int = typer.Option(20, "--tune-subsets", min=2, help="--tune-damping: LDS retrainings (cached)."),
    value: Optional[List[str]] = typer.Option(
        None, "--value", metavar="K",
        help="Retrain without the K training examples `infl value` calls most harmful for the validation half of the "
        "test split, without K random and without the K highest-loss ones; report validation and held-out (the "
        "other half) loss and accuracy next to the full-data model. K: a count (50) or a fraction (0.05, 5%); "
        "repeatable. --seeds averages retrainings; with --noise F on the noisy run (noise detection is then not run); "
        "uses the first --strategy (default influence.strategy).",
    ),
    strategies: Optional[List[str]] = typer.Option(
        None, "--strategy", "-s", metavar="NAME",
        help=f"Strategy to evaluate (repeatable; default: every registered strategy not marked slow; slow, so only when named: {SLOW_STRATEGIES}).",
    ),
) -> None:
    """Check how far to trust the rankings on your own data: injected-noise detection and LDS.

    Writes runs/<name>-noise<F>-<kind>/evaluation.json and runs/<name>/lds.json. Every
    strategy is evaluated unless -s is given (those the registry marks slow only when named); add
    --set influence.ensemble=3 to evaluate 3-model ensembles.
    """
    from influence_cli.evaluation import run_evaluate
    from influence_cli.render.evaluation import render_evaluation

    check_choice("--kind", kind, ("uniform", "class_conditional"))
    check_choice("--measurement", measurement, ("loss", "margin"))
    for name in strategies or []:
        check_strategy(name)
    tune = _tune_settings(grid, tune_subsets, strategies) if tune_damping else None
    session = open_session(config, set_)
    start = time.perf_counter()
    if value:  # --noise then picks the noisy run for --value; noise detection is not run
        evaluate_value_option(session, value, seeds, strategies, noise, kind)
        if not (lds or tune or fix):
            err.print(f"evaluation finished in {time.perf_counter() - start:.1f} s", highlight=False)
            return
        noise = None
    settings = dict(noise=noise, noise_kind=kind, lds=lds, subsets=subsets, fraction=fraction, seeds=seeds, tune=tune, fix=fix)
    run_evaluate(
        session.config,
        **settings,
        test_rows=test_rows,
        measurement=measurement,
        strategies=strategies,
        reporter=session.reporter,
        on_result=lambda part, result: (show_fixing if part == "fixing" else render_evaluation)(part, result, err),
    )
    err.print(f"evaluation finished in {time.perf_counter() - start:.1f} s", highlight=False)


def _tune_settings(grid: str, subsets: int, strategies: Optional[List[str]]) -> dict:
    """--tune-damping's arguments: the parsed grid, the retrainings and the one strategy."""
    try:
        factors = [float(part) for part in grid.split(",") if part.strip()]
    except ValueError:
        raise InflError(f"--grid: '{grid}' is not a comma-separated list of numbers (e.g. 0.1,1,10)") from None
    if not factors or any(not f > 0 for f in factors):
        raise InflError(f"--grid: '{grid}': give damping factors > 0 (e.g. 0.1,1,10)")
    if strategies and len(set(strategies)) > 1:
        raise InflError("--tune-damping tunes one strategy; give at most one -s (default: influence.strategy)")
    return {"grid": factors, "subsets": subsets, "strategy": strategies[0] if strategies else None}


def show_fixing(part: str, result: dict, console: object) -> None:
    """The fixing curve's table, and its plots in fixing.html beside fixing.json."""
    from pathlib import Path

    from rich.markup import escape

    from influence_cli.render.fixing import render_fixing_curve
    from influence_cli.render.fixing_html import write_fixing_html

    render_fixing_curve(result, console)
    page = write_fixing_html(result, Path(result["run_dir"]) / "fixing.html")
    console.print(f"→ {escape(str(Path(result['run_dir']) / 'fixing.json'))}, {escape(str(page))}", highlight=False)


def evaluate_value_option(session: Any, value: List[str], seeds: int, strategies: Optional[List[str]],
                          noise: Optional[float], kind: str) -> None:
    """`--value K`: the retrain-without evaluation (evaluation/value.py), its table on stderr."""
    from influence_cli.evaluation.value import evaluate_value
    from influence_cli.render.value import render_value_evaluation

    result = evaluate_value(
        session.config, ks=value, seeds=seeds, strategy=(strategies or [None])[0], noise=noise, noise_kind=kind,
        reporter=session.reporter,
    )
    render_value_evaluation(result, err)
