"""The package's module graph has no import circle, lazy imports inside functions included.

tests/engine/test_engine_imports.py checks the engine on its own; this checks all of
influence_cli (app, commands, config, render, ...), where a stage module importing the
``influence_cli.app`` package front door from inside a function is the usual way one sneaks in.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "influence_cli"


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Package modules ``path`` imports anywhere (module level or inside a function), except
    under ``if TYPE_CHECKING:``; ``from pkg import name`` of a non-module is an edge to pkg."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skip = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(kept + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {target for target in found if target in known and target != name}


def test_no_import_circle_in_the_package():
    known = module_files()
    graph = {name: imported_modules(name, path, known) for name, path in known.items()}
    assert graph["influence_cli.app.merge"], "the graph sees no imports: the parser is broken"
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:  # args[1]: the circle, each node a predecessor of the one before
        pytest.fail("import circle: " + " -> ".join(reversed(exc.args[1])))
