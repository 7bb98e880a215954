"""What the command modules share: the common options, `open_session` and small checks."""

from __future__ import annotations

from typing import Any, List, Optional

import typer
from rich.markup import escape

from influence_cli.errors import InflError
from influence_cli.terminal import err, log, silence_rank

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
StrategyOption = typer.Option(None, "--strategy", "-s", help=STRATEGY_HELP)
SetOption = typer.Option(
    None, "--set", metavar="KEY=VALUE",
    help="Override a config value, e.g. --set train.epochs=5 (repeatable; value read as YAML).",
)
ShardOption = typer.Option(
    None, "--shard", metavar="I/N", help="Job arrays: do only block i of n of the training set (e.g. --shard 0/4) and write a "
    "partial result under runs/<name>/shards/; combine them with `infl merge`.",
)

# Run-directory locks taken by `open_session`; `influence_cli.cli.release_run_locks` frees them.
RUN_LOCKS: list[Any] = []


def open_session(config: Optional[str], overrides: Optional[List[str]], shard: Optional[str] = None) -> Any:
    """Load the config; under torchrun join the process group (rank 0 alone prints).

    ``shard``: the ``--shard i/n`` text; the session then is that job (``Session.shard``)
    and the stages write partial results for `infl merge`."""
    from influence_cli.config import load_config
    from influence_cli.distributed import init_from_env
    from influence_cli.app import Session
    from influence_cli.progress import Reporter, RichReporter

    cfg = load_config(config, overrides or [])
    log.debug(f"config {cfg.source_file}: run directory {cfg.run_dir()}, strategy {cfg.influence.strategy}")
    dist = init_from_env(cfg.influence.device)
    if not dist.is_main:
        silence_rank()
    reporter = RichReporter(err) if dist.is_main else Reporter()
    session = Session(cfg, reporter, dist=dist, shard=parse_shard_option(shard))
    if dist.is_main:  # one command at a time writes into a run directory (rank 0 for torchrun)
        from influence_cli.run import RunLock

        root = session.run.root

        def say_waiting(pid: str) -> None:
            message = f"waiting for another infl command using {escape(str(root))} (pid {pid}) ..."
            err.print(message, highlight=False, soft_wrap=True)

        RUN_LOCKS.append(RunLock(root).acquire(say_waiting))
    return session


def parse_shard_option(text: Optional[str]) -> Any:
    """``--shard i/n`` → ``Shard`` (None without the option); one-line errors."""
    if text is None:
        return None
    from influence_cli.app.session import Shard
    from influence_cli.distributed import current, parse_shard

    try:
        index, count = parse_shard(text)
    except ValueError as exc:
        raise InflError(str(exc)) from None
    if current().active:
        raise InflError("--shard is for job arrays without a process group; under torchrun drop --shard")
    return Shard(index, count)


def say_shard_written(what: str, result: Any) -> None:
    """The line a ``--shard i/n`` job ends with: its shard file and what comes next."""
    err.print(f"{what} → {escape(str(result.path))}; when every shard is done run `infl merge`", highlight=False)


def check_strategy(strategy: Optional[str]) -> Optional[str]:
    if strategy is None:
        return None
    from influence_cli.engine import strategy_names

    names = strategy_names()
    if strategy not in names:
        raise InflError(f"--strategy: unknown strategy '{strategy}' (choose from {', '.join(names)})")
    return strategy


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    """Refuse a value outside `choices` in one line naming the option."""
    if value not in choices:
        raise InflError(f"{option}: '{value}' is not one of {', '.join(choices)}")
    return value


def model_line(state: Any) -> str:
    how = "trained" if state.trained_now else "loaded checkpoint"
    return f"model: {how}; train accuracy {state.train_accuracy:.3f}, test accuracy {state.test_accuracy:.3f}"
