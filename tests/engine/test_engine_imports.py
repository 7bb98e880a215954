"""The engine's boundaries: torch only, no app imports, no import circle, small modules.

Each check imports in a fresh interpreter and inspects ``sys.modules``, so what other
tests imported earlier in this process cannot hide a leak.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "influence_cli" / "engine"
PACKAGE = "influence_cli.engine"
# The app: nothing in the engine may import these (influence_cli.errors, the typed errors
# every layer raises, and the package's __init__ (its version) are shared leaves).
FORBIDDEN_PREFIXES = ("typer", "rich", "pydantic", "yaml", "pandas", "click")
ALLOWED_APP = {"influence_cli", "influence_cli.errors"}


def module_names() -> list[str]:
    names = []
    for path in sorted(ENGINE.rglob("*.py")):
        parts = path.relative_to(ENGINE.parent.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def loaded_after(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def app_leaks(loaded: list[str]) -> list[str]:
    leaks = [m for m in loaded if m.split(".")[0] in FORBIDDEN_PREFIXES]
    leaks += [m for m in loaded if m.startswith("influence_cli") and not m.startswith(PACKAGE) and m not in ALLOWED_APP]
    return leaks


_EACH_ALONE = r"""
import json, os, sys
import torch, numpy, safetensors.torch  # third-party, preloaded once; no engine module yet
assert not any(m.startswith("influence_cli") for m in sys.modules)
out = {}
for name in [*NAMES, "fit-and-score"]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child that has imported nothing of the package: import one module alone
        os.close(read)
        try:
            if name == "fit-and-score":
                exec(FIT_AND_SCORE)
            else:
                __import__(name)
            result = {"ok": True, "modules": sorted(sys.modules)}
        except BaseException as exc:
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        with os.fdopen(write, "w") as fh:
            fh.write(json.dumps(result))
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        out[name] = json.loads(fh.read() or '{"ok": false, "error": "child died"}')
    os.waitpid(pid, 0)
print(json.dumps(out))
"""


_FIT_AND_SCORE = """
from influence_cli.engine import fit_factors, load_factors, pairwise_scores, self_influence
import influence_cli.engine.reference
model = torch.nn.Sequential(torch.nn.Linear(4, 3))
data = [(torch.randn(6, 4), torch.randint(0, 3, (6,)))]
for name in ("ekfac", "exact", "lissa"):
    factors = fit_factors(model, data, name, options={"depth": 5} if name == "lissa" else None)
    self_influence(model, factors, data)
    pairwise_scores(model, factors, data, data[0][0][:2], data[0][1][:2])
"""


def test_every_engine_module_imports_alone_without_the_app():
    """Each engine module (each strategy included) is imported on its own in a process
    that has imported nothing of the package (forked from one interpreter that preloaded
    torch, to keep this cheap): it must load, and load no app module. A last child fits
    and scores (exact, lissa, ekfac): that loads no app module either."""
    names = module_names()
    code = _EACH_ALONE.replace("NAMES", repr(names)).replace("FIT_AND_SCORE)", f"{_FIT_AND_SCORE!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == {*names, "fit-and-score"}
    for name, result in results.items():
        assert result["ok"], f"{name}: {result.get('error')}"
        assert app_leaks(result["modules"]) == [], name


def test_the_registry_loads_no_torch_and_no_app():
    """Listing strategies, their options and flags — what the CLI's --help and the config
    need — imports neither torch nor any app module."""
    loaded = loaded_after(
        "import influence_cli.engine as e\n"
        "names = e.strategy_names()\n"
        "assert {'ekfac', 'kfac', 'diagonal', 'identity', 'exact', 'lissa'} <= set(names)\n"
        "[e.option_specs(e.get_strategy(n).options_type) for n in names if e.get_strategy(n).options_type]\n"
        "e.stored_options('lissa', {'depth': 3})"
    )
    assert "torch" not in loaded and "numpy" not in loaded
    assert app_leaks(loaded) == []


def _imports(path: Path, name: str) -> set[str]:
    """Engine modules imported anywhere in ``path`` (module level or lazily inside a
    function), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    known = set(module_names())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(child) for child in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_import_circle_even_through_lazy_imports():
    """The engine's module graph (every import, including the lazy ones inside functions)
    is acyclic; only the package __init__ may point at everything (its lazy exports)."""
    graph = {}
    for path in sorted(ENGINE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = _imports(path, name)
    for name, targets in graph.items():
        if name != PACKAGE:
            assert PACKAGE not in targets, f"{name} imports the package itself; import the submodule"
    graph[PACKAGE] = {t for t in graph[PACKAGE] if t == f"{PACKAGE}.strategies"} | {f"{PACKAGE}.options", f"{PACKAGE}.strategy"}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_declarations_do_not_import_torch_at_module_level():
    """strategy.py, options.py and strategies/*.py import torch only inside the hooks that
    fit or load (checked on the source: a module-level import of torch or of a numerical
    engine module would make `infl --help` load torch)."""
    light = {f"{PACKAGE}.options", f"{PACKAGE}.strategy", f"{PACKAGE}.strategies"}
    light |= {f"{PACKAGE}.strategies.{p.stem}" for p in (ENGINE / "strategies").glob("*.py") if p.stem != "__init__"}
    for path in [ENGINE / "options.py", ENGINE / "strategy.py", *sorted((ENGINE / "strategies").glob("*.py"))]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for target in names:
                    assert target.split(".")[0] not in ("torch", "numpy"), f"{path.name}: {target}"
                    if target.startswith(PACKAGE):
                        assert target in light, f"{path.name} imports {target} at module level"


def test_no_engine_module_is_over_400_lines():
    sizes = {p.relative_to(ENGINE).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in ENGINE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_lazy_exports_do_not_shadow_submodules():
    """A lazily exported name equal to a submodule's would turn into the module once the
    submodule is imported."""
    import pkgutil

    import influence_cli.engine as engine

    submodules = {m.name for m in pkgutil.iter_modules(engine.__path__)}
    assert submodules & set(engine._LAZY) == set()
    for name in engine.__all__:
        assert getattr(engine, name) is not None, name
