"""How the `infl` command line talks to the terminal, outside the commands themselves.

- Usage errors (unknown option, bad value, missing argument) become one line,
  ``error: <option>: <what is wrong>; <what to do>``, exit 2, like every other error.
- Help shows boolean flags as plain ``--retrain`` and arguments as ``TEST_CSV``.
- A closed output pipe (``infl config list | head -1``) ends quietly with exit 141.
- Python warnings go through `logging` and print as one line ``warning: <message>``;
  ``-q`` keeps errors only, ``-v`` adds debug messages.

`InflGroup` is the root command class, so both `infl` (``main()``) and tests that call the
app through typer's ``CliRunner`` take the same path.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import sys
import warnings
from typing import Any, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.exceptions import (
    BadOptionUsage,
    BadParameter,
    ClickException,
    MissingParameter,
    NoArgsIsHelpError,
    NoSuchOption,
    UsageError,
)
from typer.core import TyperArgument, TyperCommand, TyperGroup
from typer.exceptions import Abort, Exit

class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich exits with 1 when its output pipe is closed; end like every closed pipe
        raise SystemExit(closed_pipe())


#: stderr: tables, progress, messages and errors (stdout carries machine output only).
err = _Console(stderr=True)


def one_line(message: str) -> str:
    """Collapse a message (often a library's multi-line text) to one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


class _Output:
    """What -q/-v and torchrun decided for this process."""

    quiet = False  # -q: errors only
    rank_silenced = False  # a torchrun rank other than 0: nothing at all


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, one line; shown under -q too (not on silent ranks)."""
    quiet = err.quiet
    err.quiet = _Output.rank_silenced
    try:
        err.print(f"[bold red]error:[/bold red] {escape(one_line(message))}", highlight=False, soft_wrap=True)
    finally:
        err.quiet = quiet


def silence_rank() -> None:
    """Under torchrun only rank 0 prints: silence this process, errors included."""
    _Output.rank_silenced = True
    err.quiet = True


# ----------------------------------------------------------------------------- warnings and verbosity

#: The package's logger; `-v` shows its debug messages.
log = logging.getLogger("influence_cli")


class LineHandler(logging.Handler):
    """Every log record as one styled line on stderr: ``warning: <message>``."""

    PREFIX = {
        logging.DEBUG: "[dim]debug:[/dim] ",
        logging.INFO: "",
        logging.WARNING: "[yellow]warning:[/yellow] ",
        logging.ERROR: "[bold red]error:[/bold red] ",
    }

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prefix = self.PREFIX.get(record.levelno, self.PREFIX[logging.ERROR] if record.levelno > logging.ERROR else "")
            err.print(prefix + escape(one_line(record.getMessage())), highlight=False, soft_wrap=True)
        except Exception:  # never let a message break a command
            self.handleError(record)


_handler = LineHandler()


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """`warnings.showwarning` for the CLI: like ``logging.captureWarnings(True)`` (records on
    the ``py.warnings`` logger), but the record holds the message alone, without the file
    path, line number and source line that `warnings.formatwarning` adds."""
    if file is not None:  # an explicit file: leave it to the default behaviour
        warnings._showwarning_orig(message, category, filename, lineno, file, line)  # type: ignore[attr-defined]
        return
    text = str(message)
    if category is not UserWarning:
        text = f"{category.__name__}: {text}"
    logging.getLogger("py.warnings").warning("%s", text)


def configure_output(*, quiet: bool = False, verbose: bool = False) -> None:
    """Route warnings and log records to one-line stderr messages at the chosen verbosity:
    -q errors only (tables, progress, messages and warnings off), default warnings and
    messages, -v also debug messages."""
    logging.captureWarnings(True)  # the py.warnings logger gets every warning ...
    warnings.showwarning = _show_warning  # ... as its bare message
    level = logging.ERROR if quiet else (logging.DEBUG if verbose else logging.INFO)
    for name in ("py.warnings", "influence_cli"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = False
        if _handler not in logger.handlers:
            logger.addHandler(_handler)
    _Output.quiet = quiet
    err.quiet = quiet or _Output.rank_silenced


#: 128 + SIGPIPE: what coreutils exit with when the reader of their output went away.
CLOSED_PIPE_EXIT = 141


def closed_pipe() -> int:
    """The reader of our output went away (``| head``). Point stdout and stderr at devnull
    so that the interpreter's flush at exit does not raise again (the recipe of Python's
    signal docs, "Note on SIGPIPE"), and return the exit code to end with, quietly."""
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (tests' captured streams)
            continue
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
    return CLOSED_PIPE_EXIT


def flush_stdout(code: int) -> int:
    """Flush stdout before exiting, so that a closed pipe is noticed here and not by the
    interpreter at exit."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return closed_pipe()
    return code


# ----------------------------------------------------------------------------- usage errors

_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_LIMIT_KEYS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}


def _param_label(param: Any) -> Optional[str]:
    """How the user wrote the parameter: its long option (--top) or its argument name (TEST_CSV)."""
    if param is None:
        return None
    if isinstance(param, TyperArgument):
        return param.metavar or (param.name or "").upper()
    opts = sorted(param.opts, key=lambda o: (not o.startswith("--"), -len(o)))
    return opts[0] if opts else param.name


def _bad_value(exc: BadParameter) -> str:
    """What is wrong with the value, from pydantic's error when typer validated it."""
    from pydantic import ValidationError

    cause = exc.__cause__
    if isinstance(cause, ValidationError) and cause.errors():
        item = cause.errors()[0]
        kind, value, ctx = item["type"], item.get("input"), item.get("ctx") or {}
        if kind in _BOUNDS:
            return f"{value} is out of range; use a number {_BOUNDS[kind]} {ctx[_LIMIT_KEYS[kind]]}"
        if kind == "int_parsing":
            return f"'{value}' is not a whole number; give one such as 10"
        if kind == "float_parsing":
            return f"'{value}' is not a number; give one such as 0.1"
        if kind == "literal_error" and "expected" in ctx:
            return f"'{value}' is not one of {ctx['expected']}"
    text = one_line(exc.message).rstrip(".")
    return text[:1].lower() + text[1:]


def usage_error_line(exc: UsageError, command: str = "infl") -> str:
    """One line for a click/typer usage error: the option or argument, what is wrong, the fix.

    ``command`` names the command for the help hint when the error carries no context.
    """
    ctx = exc.ctx
    command = ctx.command_path if ctx is not None else command
    see_help = f"see '{command} --help'"
    if isinstance(exc, MissingParameter):
        label = _param_label(exc.param) or str(exc.param_hint or "argument")
        kind = exc.param_type or (exc.param.param_type_name if exc.param is not None else "parameter")
        usage = one_line(ctx.get_usage()) if ctx is not None else ""
        usage = usage[len("Usage: "):] if usage.startswith("Usage: ") else usage
        return f"{label}: missing {kind}; usage: {usage}" if usage else f"{label}: missing {kind}; {see_help}"
    if isinstance(exc, BadParameter):
        label = _param_label(exc.param) or (exc.param_hint if isinstance(exc.param_hint, str) else None)
        what = _bad_value(exc)
        fix = "" if "; " in what else f"; {see_help}"
        return f"{label}: {what}{fix}" if label else f"{what}{fix}"
    if isinstance(exc, NoSuchOption):
        known: list[str] = []
        if ctx is not None:
            for param in ctx.command.get_params(ctx):
                known += [o for o in [*param.opts, *param.secondary_opts] if o.startswith("-")]
        close = difflib.get_close_matches(exc.option_name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{exc.option_name}: no such option{hint}; {see_help}"
    if isinstance(exc, BadOptionUsage):
        text = one_line(exc.message).rstrip(".")
        text = text.replace(f"Option {exc.option_name!r} ", "").replace(f"Option '{exc.option_name}' ", "")
        text = text.replace("requires an argument", "needs a value")
        return f"{exc.option_name}: {text}; {see_help}"
    text = one_line(exc.format_message())
    match = re.fullmatch(r"No such command '(.+?)'\.(?: Did you mean (.+?)\?)?", text)
    if match:
        name, close = match.groups()
        hint = f" (did you mean {close.replace(chr(39), '')}?)" if close else ""
        return f"{name}: no such command{hint}; {see_help}"
    match = re.fullmatch(r"Got unexpected extra argument(?:s|\(s\))? \((.+)\)", text)
    if match:
        return f"{match.group(1)}: unexpected extra argument; {see_help}"
    text = text.rstrip(".")
    return f"{text[:1].lower() + text[1:]}; {see_help}"


def command_path(group: Any, prog_name: str, args: Sequence[str]) -> str:
    """The command the arguments name (``infl self-influence``), for errors without a context."""
    path, command = [prog_name], group
    for token in args:
        sub = getattr(command, "commands", {}).get(token)
        if sub is None:
            if token.startswith("-"):
                continue
            break
        path.append(token)
        command = sub
    return " ".join(path)


# ----------------------------------------------------------------------------- command classes


def reflow(text: Optional[str]) -> Optional[str]:
    """Join the lines of each paragraph of a docstring: typer's rich help keeps single
    newlines, so a wrapped docstring would print with ragged breaks."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _plain_flags(command: Any, ctx: Any) -> None:
    """Typer's rich help prints every option's type, so a flag shows as ``--retrain <bool>``
    (its plain-text help skips flags). An empty metavar makes the rich help print nothing."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


def _format_help(command: Any, format_help: Any, ctx: Any, formatter: Any) -> None:
    _plain_flags(command, ctx)
    command.help = reflow(command.help)
    format_help(ctx, formatter)


def _get_help(get_help: Any, ctx: Any) -> str:
    # typer's rich help prints to stdout while it is formatted; flush here so that a closed
    # pipe (`infl --help | head -1`) ends quietly instead of in typer's EPIPE handler (exit 1)
    try:
        text = get_help(ctx)
        sys.stdout.flush()
    except BrokenPipeError:
        raise Exit(closed_pipe()) from None
    except SystemExit as exc:  # rich's own answer to a broken pipe: exit 1
        if isinstance(exc.__context__, BrokenPipeError):
            raise Exit(closed_pipe()) from None
        raise
    return str(text)


class InflCommand(TyperCommand):
    """A command whose help shows flags without a type and arguments in capitals."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _format_help(self, super().format_help, ctx, formatter)

    def get_help(self, ctx: Any) -> str:
        return _get_help(super().get_help, ctx)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        # typer writes required arguments as {test_csv}; write them as TEST_CSV like click.
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = _param_label(param) or ""
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class InflGroup(TyperGroup):
    """The root command: runs the app with ``standalone_mode=False`` and turns every usage
    error into one line (exit 2)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _format_help(self, super().format_help, ctx, formatter)

    def get_help(self, ctx: Any) -> str:
        return _get_help(super().get_help, ctx)

    def main(  # type: ignore[override]
        self,
        args: Optional[Sequence[str]] = None,
        prog_name: Optional[str] = None,
        complete_var: Optional[str] = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        args = sys.argv[1:] if args is None else list(args)
        where = command_path(self, prog_name or self.name or "infl", args)
        code = run_group(super().main, where, args=args, prog_name=prog_name, complete_var=complete_var, **extra)
        code = flush_stdout(code)
        if standalone_mode:
            sys.exit(code)
        return code


def run_group(main: Any, where: str, **kwargs: Any) -> int:
    """Run a click main in non-standalone mode; return the exit code. ``where`` is the
    command the arguments name, for usage errors that carry no context."""
    try:
        result = main(standalone_mode=False, **kwargs)
    except NoArgsIsHelpError:
        return 2  # the help was printed when the error was made
    except UsageError as exc:
        print_error(usage_error_line(exc, where))
        return exc.exit_code
    except ClickException as exc:
        print_error(exc.format_message())
        return exc.exit_code
    except Abort:
        print_error("aborted")
        return 1
    # non-standalone click returns the exit code of typer.Exit, or the command's return value
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


class InflTyper(typer.Typer):
    """A Typer app whose commands are `InflCommand` (give the group ``cls=InflGroup``)."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or InflCommand, **kwargs)
