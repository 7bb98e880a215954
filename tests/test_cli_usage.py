"""Usage errors, help and other terminal behaviour of the CLI: one line per error, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from influence_cli.cli import app, handle_errors
from influence_cli.errors import ConfigError, DataError

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def run_module(*args: str, **kwargs: object) -> subprocess.CompletedProcess:
    """`python -m influence_cli ...` in a fresh process (the `main()` path)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "influence_cli", *args], capture_output=True, text=True, env=env, timeout=300, **kwargs
    )


USAGE_ERRORS = [
    (["self-influence", "--top", "-1"], "error: --top: -1 is out of range; use a number >= 1"),
    (["self-influence", "--top", "abc"], "error: --top: 'abc' is not a whole number; give one such as 10"),
    (["self-influence", "--top"], "error: --top: needs a value; see 'infl self-influence --help'"),
    (["self-influence", "--tpo", "3"], "error: --tpo: no such option (did you mean --top?); see 'infl self-influence --help'"),
    (["self-influence", "extra"], "error: extra: unexpected extra argument; see 'infl self-influence --help'"),
    (["score"], "error: TEST_CSV: missing argument; usage: infl score [OPTIONS] TEST_CSV"),
    (["score", "rows.csv", "--measurement", "maximum"], "error: --measurement: 'maximum' is not one of loss, margin"),
    (["evaluate", "--kind", "gaussian"], "error: --kind: 'gaussian' is not one of uniform, class_conditional"),
    (["evaluate", "--noise", "2"], "error: --noise: 2 is out of range; use a number <= 1.0"),
    (["check", "--max-flagged", "-1"], "error: --max-flagged: -1 is out of range; use a number >= 0"),
    (["trian"], "error: trian: no such command (did you mean train?); see 'infl --help'"),
    (["config", "shwo"], "error: shwo: no such command (did you mean show?); see 'infl config --help'"),
    (["--zzz"], "error: --zzz: no such option; see 'infl --help'"),
    (["--verbos", "train"], "error: --verbos: no such option (did you mean --verbose?); see 'infl --help'"),
]


@pytest.mark.parametrize("args,expected", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line_exit_2(args: list[str], expected: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [expected]
    assert result.stdout == ""


def test_usage_error_one_line_through_main() -> None:
    for args, expected in (USAGE_ERRORS[0], USAGE_ERRORS[3], USAGE_ERRORS[5]):
        done = run_module(*args)
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines() == [expected]
        assert "Traceback" not in done.stderr and "Usage:" not in done.stderr


def test_no_arguments_prints_help() -> None:
    result = runner.invoke(app, [])
    assert result.exit_code == 2
    assert "Usage: infl [OPTIONS] COMMAND" in result.stdout


def test_multi_line_core_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    @handle_errors
    def boom() -> None:
        raise DataError("rows.csv: cannot read\n\ttorch says: something\n\n  on several lines")

    with pytest.raises(typer.Exit) as info:
        boom()
    assert info.value.exit_code == 2
    assert capsys.readouterr().err == "error: rows.csv: cannot read torch says: something on several lines\n"

    @handle_errors
    def bug() -> None:
        raise RuntimeError("first\nsecond")

    with pytest.raises(typer.Exit) as info:
        bug()
    assert info.value.exit_code == 70
    assert capsys.readouterr().err.splitlines() == [
        "error: internal error: RuntimeError: first second (set INFL_DEBUG=1 for the traceback)"
    ]

    @handle_errors
    def config_problems() -> None:
        raise ConfigError(["a.yaml: train.epochs: bad", "a.yaml: train.lr: bad"])

    with pytest.raises(typer.Exit):
        config_problems()
    assert capsys.readouterr().err.splitlines() == ["error: a.yaml: train.epochs: bad", "error: a.yaml: train.lr: bad"]


def test_pickled_checkpoint_refused_in_one_line(tmp_path: Path) -> None:
    import torch
    from torch import nn

    torch.save(nn.Sequential(nn.Linear(3, 2)), tmp_path / "whole-model.pt")  # a module, not a state_dict
    config = {
        "name": "pickled",
        "data": {"source": "synthetic", "synthetic": {"num_train": 20, "num_test": 5, "shape": [3], "num_classes": 2}},
        "model": {"arch": "mlp", "hidden_sizes": [], "checkpoint": "whole-model.pt"},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["train", "-c", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'whole-model.pt'}: holds a pickled Python object (torch.nn.modules.container.Sequential), "
        "not only tensors, and is not unpickled for safety; save a plain state_dict "
        "(torch.save(model.state_dict(), path)) or convert it to .safetensors"
    ]


def _commands() -> list[list[str]]:
    from typer.main import get_command

    root = get_command(app)
    paths = [[]]
    for name, command in root.commands.items():
        paths.append([name])
        for sub in getattr(command, "commands", {}):
            paths.append([name, sub])
    return paths


COMMANDS = _commands()


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) or "infl" for p in COMMANDS])
def test_help_of_every_command(path: list[str]) -> None:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.stdout
    assert "{" not in result.stdout and "}" not in result.stdout
    assert f"Usage: {' '.join(['infl', *path])}" in result.stdout


def test_help_details() -> None:
    top = " ".join(runner.invoke(app, ["--help"]).stdout.split())  # undo the wrapping
    for code in ("0 success", "1 `infl check` failed", "2 bad usage", "70 internal error", "130 interrupted", "141"):
        assert code in top, code
    score_help = runner.invoke(app, ["score", "--help"]).stdout
    assert "Usage: infl score [OPTIONS] TEST_CSV" in score_help
    train_help = runner.invoke(app, ["train", "--help"]).stdout
    retrain = next(line for line in train_help.splitlines() if "--retrain" in line)
    assert retrain.split("--retrain", 1)[1].split()[0] == "Train"  # no type between the flag and its help


def test_every_option_has_a_help_text() -> None:
    from typer.main import get_command

    def walk(command: object, path: str) -> list[str]:
        missing = []
        for param in command.params:  # type: ignore[attr-defined]
            if len((param.help or "").strip()) < 10:
                missing.append(f"{path} {param.name}")
        for name, sub in getattr(command, "commands", {}).items():
            missing += walk(sub, f"{path} {name}")
        return missing

    assert walk(get_command(app), "infl") == []
