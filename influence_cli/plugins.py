"""Import the user's 'package.module:function' (model.factory, data.factory)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from influence_cli.errors import InflError


def import_callable(spec: str, folder: Optional[str], field: str, error: type[InflError]) -> Callable[..., Any]:
    """The function ``spec`` names; ``folder`` goes first on sys.path. Import failures
    become one-line ``error``s naming the config field (``model.factory`` ...)."""
    module_name, _, function_name = spec.partition(":")
    if folder:
        where = str(Path(folder).expanduser().resolve())
        if where not in sys.path:
            sys.path.insert(0, where)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may raise anything on import
        raise error(
            f"{field}: cannot import '{module_name}': {type(exc).__name__}: {exc} (set {field}_path to its folder)"
        ) from None
    function: Callable[..., Any] | None = getattr(module, function_name, None)
    if not callable(function):
        raise error(f"{field}: '{module_name}' has no function '{function_name}'")
    return function
