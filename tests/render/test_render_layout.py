"""audit/ decides, render/ shows: the split stays as built."""

from __future__ import annotations

import ast
from pathlib import Path

import influence_cli

PACKAGE = Path(influence_cli.__file__).parent
PRESENTATION = {"rich", "html", "xml", "PIL", "base64"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
            if node.module.startswith("influence_cli.render"):
                roots.add("influence_cli.render")
    return roots


def test_audit_renders_and_writes_nothing() -> None:
    for path in sorted((PACKAGE / "audit").glob("*.py")):
        roots = _imported_roots(path)
        assert not roots & (PRESENTATION | {"influence_cli.render"}), (path.name, roots & PRESENTATION)
        text = path.read_text(encoding="utf-8")
        assert "atomic" not in text and "to_csv(" not in text and "open(" not in text, path.name


def test_render_modules_stay_small() -> None:
    for path in sorted((PACKAGE / "render").glob("*.py")):
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 400, path.name
