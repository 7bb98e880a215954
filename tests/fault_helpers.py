"""Helpers for the fault tests: a tiny table experiment and ways to damage files.

(A uniquely named module, not conftest, so `import` cannot pick up another conftest.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import torch
import yaml
from typer.testing import CliRunner

from influence_cli.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_one_line_error(result, code: int = 2) -> str:
    """The command failed with ``code`` and exactly one 'error:' line, no traceback."""
    assert result.exit_code == code, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    return lines[0]


def write_table(path: Path, n: int = 60) -> Path:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=gen)
    labels = ["yes" if v > 0 else "no" for v in x[:, 0]]
    pd.DataFrame({"f1": x[:, 0], "f2": x[:, 1], "f3": x[:, 2], "label": labels}).to_csv(path, index=False)
    return path


def table_config(folder: Path, table: Path, runs: Path, name: str = "tiny", **sections) -> Path:
    """A config file in ``folder`` for the table at ``table`` (absolute, so copies of a run
    made from it keep their content hashes), with runs under ``runs``."""
    cfg = {
        "name": name,
        "data": {"source": "table", "path": str(table), "test_fraction": 0.25},
        "model": {"arch": "mlp", "hidden_sizes": [8]},
        "train": {"epochs": 20, "batch_size": 16, "lr": 0.01},
        "influence": {"strategy": "ekfac"},  # the fault tests follow the ekfac pipeline's files
        "output": {"dir": str(runs)},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------- damage


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path) -> None:
    """Flip one bit of the byte in the middle of the file (same length)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def flip_digit(path: Path) -> None:
    """Change one digit in the middle of a JSON file so that it still parses: only a
    content hash can tell. (The first digit of a number or word: a last digit of a long
    float can be beyond its precision and parse to the same value.)"""
    text = path.read_text()
    digits = [m.start() for m in re.finditer(r"(?<![\w.])\d", text)]
    assert digits, path
    i = min(digits, key=lambda k: abs(k - len(text) // 2))
    damaged = text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :]
    json.loads(damaged)  # still valid JSON
    path.write_text(damaged)


DAMAGE = {"truncated": truncate, "flipped byte": flip_byte}
