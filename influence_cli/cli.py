"""The `infl` command line: parse options, call one app stage, render the result.

No numerical code lives here. Machine output (CSV) goes to files or stdout; tables,
progress and summaries go to stderr. Exit codes: 0 success, 1 a check failed its
thresholds, 2 bad usage/config/input, 130 interrupted, 70 an internal error.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, TypeVar

import typer
from rich.markup import escape
from typer._click.exceptions import UsageError

from influence_cli import __version__
from influence_cli.errors import ConfigError, InflError
from influence_cli.terminal import (
    InflGroup,
    InflTyper,
    closed_pipe,
    configure_output,
    err,
    log,
    print_error,
    silence_rank,
)

F = TypeVar("F", bound=Callable[..., Any])

app = InflTyper(
    cls=InflGroup,
    name="infl",
    help=(
        "Audit labelled training data with influence functions (EK-FAC): find mislabelled, "
        "ambiguous or harmful training examples and explain predictions.\n\n"
        "Without -c every command uses the bundled digits-mlp config (real handwritten "
        "digits, no download).\n\n"
        "Global options go before the command: `infl -q check` prints errors only (no tables, "
        "progress, messages or warnings; CSV on stdout is unchanged), `infl -v self-influence` adds "
        "debug messages. Python warnings print as one line, `warning: <message>`.\n\n"
        "Exit codes: 0 success; 1 `infl check` failed its thresholds; 2 bad usage, config or input "
        "(one line names the file or option and the fix); 70 internal error (a bug: INFL_DEBUG=1 shows "
        "the traceback); 130 interrupted (Ctrl-C); 141 the output pipe was closed (e.g. `| head`)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = InflTyper(cls=InflGroup, help="List the bundled configs or show a resolved config.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOption = typer.Option(
    None, "--config", "-c", metavar="CONFIG",
    help="YAML config file, or the name of a bundled config (see `infl config list`); default digits-mlp.",
)


def strategy_help() -> str:
    """--strategy help from the registry: every strategy's name and description (the
    registry and the strategy declarations do not import torch)."""
    from influence_cli.engine import STRATEGIES

    choices = "; ".join(
        f"{name}: {cls.description}" + (f", settings in influence.{name}" if cls.options_type else "")
        for name, cls in STRATEGIES.items()
    )
    return f"How (H + λI)⁻¹ is approximated (default: influence.strategy) — {choices}."


def slow_strategy_names() -> str:
    """The registry's ``slow`` strategies (``infl evaluate`` runs them only when named)."""
    from influence_cli.engine import STRATEGIES

    return ", ".join(name for name, cls in STRATEGIES.items() if cls.slow) or "none"


STRATEGY_HELP = strategy_help()
SLOW_STRATEGIES = slow_strategy_names()
SetOption = typer.Option(
    None, "--set", metavar="KEY=VALUE",
    help="Override a config value, e.g. --set train.epochs=5 (repeatable; value read as YAML).",
)


def fail(message: str, code: int = 2) -> None:
    print_error(message)  # one line, even when the message wraps a library's multi-line text
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn core errors into one-line messages and exit codes; never show a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit, UsageError):
            raise
        except BrokenPipeError:  # `infl ... | head`: the reader went away; end quietly
            raise typer.Exit(closed_pipe())
        except ConfigError as exc:
            for line in exc.problems:  # one line per problem
                print_error(line)
            raise typer.Exit(2)
        except InflError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]: finished stages are kept; partial outputs were discarded")
            raise typer.Exit(130)
        except OSError as exc:
            from influence_cli.errors import WRITE_ERRNOS

            if exc.errno in WRITE_ERRNOS and exc.filename:  # the environment refused, not a bug
                fail(f"{exc.filename}: {exc.strerror}; check the path, its permissions and the free space", 2)
            internal_error(exc)
        except Exception as exc:  # a bug: say so in one line, full traceback on request
            internal_error(exc)
        finally:
            release_run_locks()

    return wrapper  # type: ignore[return-value]


def internal_error(exc: Exception) -> None:
    if os.environ.get("INFL_DEBUG"):
        raise exc
    fail(f"internal error: {type(exc).__name__}: {exc} (set INFL_DEBUG=1 for the traceback)", 70)


_RUN_LOCKS: list[Any] = []


def release_run_locks() -> None:
    while _RUN_LOCKS:
        _RUN_LOCKS.pop().release()


ShardOption = typer.Option(
    None, "--shard", metavar="I/N", help="Job arrays: do only block i of n of the training set (e.g. --shard 0/4) and write a "
    "partial result under runs/<name>/shards/; combine them with `infl merge`.",
)


def open_session(config: Optional[str], overrides: Optional[List[str]]) -> Any:
    """Load the config; under torchrun join the process group (rank 0 alone prints)."""
    from influence_cli.config import load_config
    from influence_cli.distributed import init_from_env
    from influence_cli.app import Session
    from influence_cli.progress import Reporter, RichReporter

    cfg = load_config(config, overrides or [])
    log.debug(f"config {cfg.source_file}: run directory {cfg.run_dir()}, strategy {cfg.influence.strategy}")
    dist = init_from_env(cfg.influence.device)
    if not dist.is_main:
        silence_rank()
    session = Session(cfg, RichReporter(err) if dist.is_main else Reporter(), dist=dist)
    if dist.is_main:  # one command at a time writes into a run directory (rank 0 for torchrun)
        from influence_cli.run import RunLock

        root = session.run.root

        def say_waiting(pid: str) -> None:
            message = f"waiting for another infl command using {escape(str(root))} (pid {pid}) ..."
            err.print(message, highlight=False, soft_wrap=True)

        _RUN_LOCKS.append(RunLock(root).acquire(say_waiting))
    return session


def parse_shard_option(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    from influence_cli.distributed import current, parse_shard

    try:
        shard = parse_shard(text)
    except ValueError as exc:
        raise InflError(str(exc)) from None
    if current().active:
        raise InflError("--shard is for job arrays without a process group; under torchrun drop --shard")
    return shard


def check_strategy(strategy: Optional[str]) -> Optional[str]:
    if strategy is None:
        return None
    from influence_cli.engine import strategy_names

    names = strategy_names()
    if strategy not in names:
        raise InflError(f"--strategy: unknown strategy '{strategy}' (choose from {', '.join(names)})")
    return strategy


def model_line(state: Any) -> str:
    how = "trained" if state.trained_now else "loaded checkpoint"
    return f"model: {how}; train accuracy {state.train_accuracy:.3f}, test accuracy {state.test_accuracy:.3f}"


# ----------------------------------------------------------------------------- commands


@app.command()
@handle_errors
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


@app.command("fit-factors")
@handle_errors
def fit_factors_command(
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    strategy: Optional[str] = typer.Option(
        None, "--strategy", "-s", help=STRATEGY_HELP
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Refit even if factors exist (needed when they are stale)."),
    shard: Optional[str] = ShardOption,
) -> None:
    """Fit and store curvature factors (runs training first when needed).

    With --shard i/n: pass-1 sums of block i (ekfac: after `infl merge`, the same command
    again runs pass 2 in the merged bases).
    """
    from influence_cli.app import ensure_factors, ensure_model

    session = open_session(config, set_)
    strategy = check_strategy(strategy) or session.config.influence.strategy
    check_strategy(strategy)
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


@app.command("self-influence")
@handle_errors
def self_influence_command(
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    top: Optional[int] = typer.Option(None, "--top", "-n", min=1, help="Rows in the table (default audit.top, 20)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Also write the full ranking CSV here ('-' for stdout)."
    ),
    strategy: Optional[str] = typer.Option(
        None, "--strategy", "-s", help=STRATEGY_HELP
    ),
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
    session = open_session(config, set_)
    shard_ = parse_shard_option(shard)
    if shard_ is not None:
        from influence_cli.app.shards import self_influence_shard

        path = self_influence_shard(session, *shard_, strategy=check_strategy(strategy))
        err.print(f"self-influence shard {shard} → {escape(str(path))}; when every shard is done run `infl merge`", highlight=False)
        return
    result = run_self_influence(session, check_strategy(strategy))
    if not session.dist.is_main:
        return
    cfg = session.config
    err.print(model_line(result.model_state), highlight=False)
    title = f"{cfg.name}: most self-influential training examples ({result.summary['run']['strategy']})"
    render_self_influence_table(result.table, top or cfg.audit.top, err, title)
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


@app.command()
@handle_errors
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
    strategy: Optional[str] = typer.Option(
        None, "--strategy", "-s", help=STRATEGY_HELP
    ),
    measurement: str = typer.Option(
        "loss", "--measurement", "-m", help="What to explain: 'loss' (of the label) or 'margin' (logit of the label minus the others)."
    ),
    matrix: Optional[Path] = typer.Option(
        None, "--matrix", help="Also write the full test × train score matrix (safetensors, with row and column ids)."
    ),
    shard: Optional[str] = ShardOption,
) -> None:
    """Explain predictions: the training examples that pushed each test row towards its label (proponents) and away (opponents).

    score(train i, test t) = g_tᵀ(H + λI)⁻¹g_i; positive = proponent. Rows without a label are
    measured against the model's prediction.
    """
    from influence_cli.app import run_score
    from influence_cli.render.tables import render_score_table
    from influence_cli.run import check_output_file

    if measurement not in ("loss", "margin"):
        raise InflError(f"--measurement: '{measurement}' is not one of loss, margin")
    for path, option, example in ((out, "--out", "scores.csv"), (matrix, "--matrix", "scores.safetensors")):
        if path is not None and str(path) != "-":
            check_output_file(path, option, example)
    session = open_session(config, set_)
    shard_ = parse_shard_option(shard)
    if shard_ is not None:
        from influence_cli.app.shards import score_shard

        if matrix is not None:
            raise InflError("--matrix cannot be combined with --shard (shards keep the top N only)")
        path = score_shard(
            session, test_csv, *shard_, top=top, strategy=check_strategy(strategy), measurement=measurement, out=out
        )
        err.print(f"score shard {shard} → {escape(str(path))}; when every shard is done run `infl merge`", highlight=False)
        return
    result = run_score(
        session,
        test_csv,
        top=top,
        strategy=check_strategy(strategy),
        measurement=measurement,
        matrix_path=matrix,
        out=out,
    )
    if not session.dist.is_main:
        return
    render_score_table(result.table, err, title=f"{session.config.name}: training examples behind each prediction")
    unlabeled = int((result.queries.labels < 0).sum())
    if unlabeled:
        err.print(f"{unlabeled} row(s) had no label: measured against the model's prediction (test_label is empty).")
    target = out if out is not None and str(out) != "-" else session.run.scores_csv(Path(test_csv).stem)
    extra = f", matrix → {escape(str(matrix))}" if matrix else ""
    err.print(
        f"{len(result.queries.ids)} test rows scored against {len(session.data().train)} training examples "
        f"in {result.seconds:.1f} s → {escape(str(target))}{extra}",
        highlight=False,
    )
    if out is not None and str(out) == "-":
        result.table.to_csv(sys.stdout, index=False)


@app.command()
@handle_errors
def check(
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    max_flagged_fraction: Optional[float] = typer.Option(
        None, "--max-flagged-fraction", min=0.0, max=1.0,
        help="Fail when more than this share of examples is flagged (default audit.check, else 0.02).",
    ),
    max_flagged: Optional[int] = typer.Option(None, "--max-flagged", min=0, help="Fail when more than N examples are flagged."),
    baseline: Optional[Path] = typer.Option(
        None, "--baseline", help="Accepted earlier mislabels.csv/check.csv: its ids do not count."
    ),
    write_baseline: Optional[Path] = typer.Option(
        None, "--write-baseline", help="Write every currently flagged example to this CSV, to accept them."
    ),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write a JUnit XML report (one test case per threshold)."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write a Markdown summary here."),
    strategy: Optional[str] = typer.Option(None, "--strategy", "-s", help=STRATEGY_HELP),
) -> None:
    """Data-quality gate for CI: exit 0 within thresholds, 1 when exceeded, 2 on bad input.

    Flagged examples follow audit.flag (see README). With --baseline only new suspects count.
    Appends a Markdown summary to $GITHUB_STEP_SUMMARY when that is set.
    """
    from influence_cli.app import run_check
    from influence_cli.render.ci import render_check, write_baseline as write_baseline_csv, write_ci_outputs

    session = open_session(config, set_)
    outcome = run_check(
        session,
        max_flagged_fraction=max_flagged_fraction,
        max_flagged=max_flagged,
        baseline=baseline,
        strategy=check_strategy(strategy),
    )
    result = outcome.result
    name = session.config.name
    if not session.dist.is_main:
        if not result.passed:
            raise typer.Exit(1)
        return
    if write_baseline is not None:
        write_baseline_csv(outcome.self_influence.table, write_baseline, err)
    write_ci_outputs(result, name, junit=junit, markdown=markdown)
    render_check(result, name, outcome.thresholds_from, session.run.root / "check.csv", err)
    if not result.passed:
        raise typer.Exit(1)


@app.command()
@handle_errors
def report(
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    top: int = typer.Option(50, "--top", "-n", min=1, help="Suspects shown as cards in the gallery."),
    strategy: Optional[str] = typer.Option(None, "--strategy", "-s", help=STRATEGY_HELP),
) -> None:
    """Write runs/<name>/report.html: a self-contained gallery of the top suspects."""
    from influence_cli.app import run_report

    session = open_session(config, set_)
    path, si = run_report(session, strategy=check_strategy(strategy), top=top)
    err.print(f"report: {escape(str(path))} ({si.summary['run']['flagged']} flagged of {si.summary['run']['examples']})")


@app.command()
@handle_errors
def evaluate(
    config: Optional[str] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    noise: Optional[float] = typer.Option(
        None, "--noise", min=0.0, max=1.0,
        help="Flip this share of training labels (seeded), retrain, and measure how well each ranking finds them "
        "(AUROC, average precision, precision@k, recall in the top 5/10/20 %). Default 0.1 when --lds is not given.",
    ),
    kind: str = typer.Option("uniform", "--kind", help="Label noise: uniform (random other class) or class_conditional (a fixed confusion)."),
    lds: bool = typer.Option(False, "--lds", help="Linear datamodeling score: retrain on random subsets and correlate with predicted effects."),
    subsets: int = typer.Option(100, "--subsets", min=2, help="LDS: number of random training subsets (each retraining is cached)."),
    fraction: float = typer.Option(0.5, "--fraction", min=0.01, max=0.99, help="LDS: share of the training set in each subset."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="LDS: retrainings per subset (averaged)."),
    test_rows: int = typer.Option(100, "--test-rows", min=1, help="LDS: the first N rows of the test split."),
    measurement: str = typer.Option("loss", "--measurement", "-m", help="LDS: loss or margin."),
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

    if kind not in ("uniform", "class_conditional"):
        raise InflError(f"--kind: '{kind}' is not one of uniform, class_conditional")
    if measurement not in ("loss", "margin"):
        raise InflError(f"--measurement: '{measurement}' is not one of loss, margin")
    for name in strategies or []:
        check_strategy(name)
    session = open_session(config, set_)
    start = time.perf_counter()
    run_evaluate(
        session.config,
        noise=noise,
        noise_kind=kind,
        lds=lds,
        subsets=subsets,
        fraction=fraction,
        seeds=seeds,
        test_rows=test_rows,
        measurement=measurement,
        strategies=strategies,
        reporter=session.reporter,
        on_result=lambda part, result: render_evaluation(part, result, err),
    )
    err.print(f"evaluation finished in {time.perf_counter() - start:.1f} s", highlight=False)


@app.command()
@handle_errors
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


@config_app.command("list")
@handle_errors
def config_list() -> None:
    """List the bundled configs (use them with -c NAME)."""
    from influence_cli.config import DEFAULT_CONFIG, bundled_configs, bundled_summary

    for name, path in sorted(bundled_configs().items()):
        source, arch = bundled_summary(path)
        mark = " (default)" if name == DEFAULT_CONFIG else ""
        typer.echo(f"{name}{mark}\t{source} / {arch}")


@config_app.command("show")
@handle_errors
def config_show(config: Optional[str] = ConfigOption, set_: Optional[List[str]] = SetOption) -> None:
    """Print the resolved config (defaults filled in, overrides applied) as YAML."""
    from influence_cli.config import load_config

    typer.echo(load_config(config, set_ or []).to_yaml(), nl=False)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"infl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Show the version."),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Print errors only: no tables, progress bars, messages or warnings."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print debug messages (config, run directory)."),
) -> None:
    """Audit labelled training data with influence functions."""
    if quiet and verbose:
        raise UsageError("-q/--quiet and -v/--verbose exclude each other; give one")
    configure_output(quiet=quiet, verbose=verbose)


def main() -> None:
    app(prog_name="infl")
