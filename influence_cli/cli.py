"""The `infl` command line: the Typer app, its root options and the error handling.

Each command lives in its own module of `influence_cli.commands`; `add_commands` puts
them on the app. No numerical code lives here. Machine output (CSV) goes to files or
stdout; tables, progress and summaries go to stderr. Exit codes: 0 success, 1 a check failed its
thresholds, 2 bad usage/config/input, 130 interrupted, 70 an internal error.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, TypeVar

import typer
from typer._click.exceptions import UsageError

from influence_cli import __version__
from influence_cli.commands import common, load
from influence_cli.errors import ConfigError, InflError
from influence_cli.terminal import InflGroup, InflTyper, closed_pipe, configure_output, err, print_error

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


def release_run_locks() -> None:
    """Free the run-directory locks `open_session` took (after every command)."""
    while common.RUN_LOCKS:
        common.RUN_LOCKS.pop().release()


def add_commands(target: typer.Typer) -> None:
    """Put every command of `influence_cli.commands` on the app, each behind `handle_errors`."""
    groups: dict[str, typer.Typer] = {}
    declared_groups, commands = load()
    for group in declared_groups:
        groups[group.name] = InflTyper(cls=InflGroup, help=group.help, no_args_is_help=True)
        target.add_typer(groups[group.name], name=group.name)
    for entry in commands:
        where = groups[entry.group] if entry.group else target
        where.command(entry.name)(handle_errors(entry.function))


add_commands(app)


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
