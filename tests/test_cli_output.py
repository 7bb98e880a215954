"""Python warnings as one styled line; -q (errors only) and -v (debug) on the root command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from influence_cli.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def one_example_class_config(tmp_path: Path) -> Path:
    """A table where class 'c' has a single example: the stratified split cannot work and
    data/common.py: split_indices warns."""
    frame = pd.DataFrame({
        "f1": [float(i % 7) for i in range(40)],
        "f2": [float(i % 5) for i in range(40)],
        "label": ["a"] * 20 + ["b"] * 19 + ["c"],
    })
    frame.to_csv(tmp_path / "rows.csv", index=False)
    config = {
        "name": "one-c",
        "data": {"source": "table", "path": "rows.csv", "test_fraction": 0.25},
        "model": {"arch": "mlp", "hidden_sizes": [4]},
        "train": {"epochs": 2, "batch_size": 16},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def warning_lines(stderr: str) -> list[str]:
    # (tmp_path holds the test's name, which holds "warning": look at the line starts)
    return [line for line in stderr.splitlines() if line.startswith("warning:") or "Warning:" in line]


def test_warning_is_one_line_and_quiet_hides_it(tmp_path: Path) -> None:
    path = one_example_class_config(tmp_path)
    result = runner.invoke(app, ["train", "-c", str(path)])
    assert result.exit_code == 0, result.output
    (line,) = warning_lines(result.stderr)
    assert line.startswith(f"warning: {tmp_path / 'rows.csv'}: cannot stratify the test split (")
    assert line.endswith("); using a random seeded split")
    assert ".py" not in result.stderr and "warnings.warn" not in result.stderr and "UserWarning" not in result.stderr
    assert "model: trained" in result.stderr

    quiet = runner.invoke(app, ["-q", "train", "-c", str(path), "--retrain"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""  # no warning, no model line: errors only
    assert (tmp_path / "runs" / "one-c" / "checkpoint.safetensors").is_file()


def test_warning_one_line_through_main(tmp_path: Path) -> None:
    path = one_example_class_config(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "influence_cli", "train", "-c", str(path)], capture_output=True, text=True, env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (line,) = warning_lines(done.stderr)
    assert line.startswith("warning: ") and "cannot stratify the test split" in line
    assert ".py:" not in done.stderr


def test_quiet_keeps_errors_and_stdout(tmp_path: Path) -> None:
    path = one_example_class_config(tmp_path)
    bad = runner.invoke(app, ["-q", "train", "-c", str(path), "--set", "train.epochs=0"])
    assert bad.exit_code == 2
    assert bad.stderr.splitlines() == [f"error: {path}: train.epochs: 0 is out of range; use a number >= 1"]
    shown = runner.invoke(app, ["-q", "config", "show", "-c", str(path)])
    assert shown.exit_code == 0 and yaml.safe_load(shown.stdout)["name"] == "one-c"
    ranking = runner.invoke(app, ["-q", "self-influence", "-c", str(path), "-o", "-"])
    assert ranking.exit_code == 0, ranking.output
    assert ranking.stderr == ""
    assert ranking.stdout.splitlines()[0].startswith("rank,index,id,label")


def test_verbose_prints_debug_lines(tmp_path: Path) -> None:
    path = one_example_class_config(tmp_path)
    result = runner.invoke(app, ["-v", "train", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert f"debug: config {path}: run directory {tmp_path / 'runs' / 'one-c'}, strategy auto" in result.stderr.splitlines()
    plain = runner.invoke(app, ["train", "-c", str(path)])
    assert "debug:" not in plain.stderr  # the level is reset for every invocation


def test_quiet_and_verbose_exclude_each_other() -> None:
    result = runner.invoke(app, ["-q", "-v", "config", "list"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["error: -q/--quiet and -v/--verbose exclude each other; give one; see 'infl --help'"]


def test_reporter_messages_respect_quiet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from influence_cli.progress import RichReporter
    from influence_cli.terminal import configure_output, err

    configure_output(quiet=True)
    try:
        reporter = RichReporter(err)
        reporter.info("an info line")
        reporter.warn("a warning line")
        assert capsys.readouterr().err == ""
    finally:
        configure_output()
    reporter.warn("a [bold]warning[/bold] line")
    assert capsys.readouterr().err == "warning: a [bold]warning[/bold] line\n"
