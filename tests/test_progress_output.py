"""No blank lines at the top of any command's output, in a log file or in a terminal."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.progress import RichReporter

ROOT = Path(__file__).resolve().parents[1]
CONTROL = re.compile(r"\x1b\[([?0-9;]*)([A-Za-z])")


def screen(text: str) -> list[str]:
    """What a terminal shows after `text`: the subset of VT100 that rich's progress bars use
    (carriage return, newline, cursor up, erase line; colours and cursor visibility ignored)."""
    lines, row, col, i = [""], 0, 0, 0
    while i < len(text):
        match = CONTROL.match(text, i)
        if match:
            arg, command = match.groups()
            if command == "A":
                row = max(0, row - int(arg or 1))
            elif command == "K":
                lines[row] = "" if arg == "2" else lines[row][:col]
            i = match.end()
            continue
        ch = text[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
            lines.extend([""] * (row + 1 - len(lines)))
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + ch + line[col + 1:]
            col += 1
        i += 1
    return lines


def assert_no_blank_lines_at_top(lines: list[str]) -> None:
    assert lines and lines[0].strip(), lines[:5]
    blank = [not line.strip() for line in lines[:-1]]  # the last line is the one after the final newline
    runs = [i for i in range(1, len(blank)) if blank[i] and blank[i - 1]]
    assert not runs, lines


def tiny_config(tmp_path: Path) -> Path:
    config = {
        "name": "tiny",
        "data": {"source": "synthetic", "synthetic": {"num_train": 60, "num_test": 20, "shape": [4], "num_classes": 3}},
        "model": {"arch": "mlp", "hidden_sizes": [8]},
        "train": {"epochs": 3, "batch_size": 16},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def exercise(reporter: RichReporter) -> None:
    with reporter.task("training", 10) as advance:
        for _ in range(10):
            advance(1)
    with reporter.stages(6) as on_batch:
        on_batch("pass 1", 6)
        on_batch("pass 2", 6)
    with reporter.stages(6):
        pass  # a progress that never gets a task
    reporter.console.print("first real line")


@pytest.mark.parametrize(
    "options",
    [{}, {"force_terminal": True, "force_interactive": True}, {"force_terminal": True, "force_interactive": False}],
    ids=["file", "terminal", "dumb-terminal"],
)
def test_reporter_prints_no_blank_lines(options: dict) -> None:
    buffer = io.StringIO()
    exercise(RichReporter(Console(file=buffer, width=80, **options)))
    lines = screen(buffer.getvalue())
    assert lines[0] == "first real line", lines
    if options.get("force_interactive"):
        assert "\x1b[" in buffer.getvalue()  # the bars were drawn (and then removed)


def test_commands_start_without_blank_lines_when_captured(tmp_path: Path) -> None:
    path = tiny_config(tmp_path)
    runner = CliRunner()
    for command in (["train"], ["fit-factors"], ["self-influence", "--top", "3"], ["check"]):
        result = runner.invoke(app, [*command, "-c", str(path)])
        assert result.exit_code in (0, 1), result.output
        assert_no_blank_lines_at_top(result.stderr.split("\n"))


@pytest.mark.parametrize("term", ["xterm-256color", "dumb"])
def test_command_in_a_terminal_starts_with_its_first_line(tmp_path: Path, term: str) -> None:
    path = tiny_config(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TTY_COMPATIBLE="1", TERM=term, COLUMNS="100")
    env.pop("TTY_INTERACTIVE", None)
    done = subprocess.run(
        [sys.executable, "-m", "influence_cli", "self-influence", "-c", str(path), "--top", "3"],
        capture_output=True, env=env, timeout=600,  # bytes: text mode would turn "\r" into "\n"
    )
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    if term != "dumb":
        assert "\x1b[2K" in stderr  # progress bars were drawn and erased
    lines = screen(stderr)
    assert lines[0].startswith("strategy: auto → exact"), lines[:3]  # said once, before any work
    assert lines[1].startswith("model: trained"), lines[:3]
    assert_no_blank_lines_at_top(lines)
