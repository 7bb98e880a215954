"""The `infl` commands, one module each; a new command is one new module here.

A module declares its command with ``@command("name")`` (``group=`` for a sub-command,
after ``group(name, help)``); `influence_cli.cli` calls `load()` and registers every
declared command on the Typer app, wrapped in its error handling. `ORDER` is the order of
`infl --help`; modules not listed there follow it, alphabetically.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

ORDER = ("train", "fit_factors", "self_influence", "score", "value", "check", "fix", "report", "evaluate", "merge", "config")
NOT_COMMANDS = {"common"}


@dataclass(frozen=True)
class Command:
    name: str
    function: Callable[..., Any]
    group: Optional[str] = None


@dataclass(frozen=True)
class Group:
    name: str
    help: str


_COMMANDS: list[Command] = []
_GROUPS: list[Group] = []


def command(name: str, *, group: Optional[str] = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a command (of the sub-command `group`, when given); the function is unchanged."""

    def declare(function: Callable[..., Any]) -> Callable[..., Any]:
        _COMMANDS.append(Command(name, function, group))
        return function

    return declare


def group(name: str, help: str) -> None:
    """Declare a sub-command group such as `infl config ...`."""
    _GROUPS.append(Group(name, help))


def module_names() -> list[str]:
    """The command modules: `ORDER` first, then any other module of the package."""
    found = {info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")}
    found -= NOT_COMMANDS
    return [name for name in ORDER if name in found] + sorted(found - set(ORDER))


def load() -> tuple[list[Group], list[Command]]:
    """Import every command module (once) and return the declared groups and commands."""
    for name in module_names():
        importlib.import_module(f"{__name__}.{name}")
    return list(_GROUPS), list(_COMMANDS)
