"""evaluation/ holds metrics and procedures only: no rendering, small modules and functions."""

from __future__ import annotations

import ast
from pathlib import Path

EVALUATION = Path(__file__).resolve().parents[2] / "influence_cli" / "evaluation"


def parsed() -> dict[str, ast.Module]:
    return {path.name: ast.parse(path.read_text()) for path in sorted(EVALUATION.glob("*.py"))}


def test_no_rendering_and_no_second_command_line():
    assert not (EVALUATION / "__main__.py").exists()  # `infl evaluate` is the one entry point
    for name, tree in parsed().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in ("rich", "argparse", "typer"), (name, module)
                # the file writers are allowed (evaluation.json, lds.json); no tables or HTML
                rendering = module.startswith("influence_cli.render") and module != "influence_cli.render.files"
                assert not rendering, (name, module)


def test_modules_and_functions_stay_small():
    for name, tree in parsed().items():
        assert len((EVALUATION / name).read_text().splitlines()) <= 400, name
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 70, (name, node.name)
