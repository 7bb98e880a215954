"""A closed output pipe (`infl config list | head -1`) ends quietly: no message, exit 141."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path) -> Path:
    config = {
        "name": "tiny",
        "data": {"source": "synthetic", "synthetic": {"num_train": 45, "num_test": 15, "shape": [3], "num_classes": 2}},
        "model": {"arch": "mlp", "hidden_sizes": [8]},
        "train": {"epochs": 5, "batch_size": 16},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_into_closed_pipe(args: list[str], cwd: Path, stream: str = "stdout") -> tuple[int, str]:
    """Run `python -m influence_cli ARGS` with `stream` writing into a pipe whose reader has
    already gone (what `| head -1` leaves behind once head has exited); return the exit code
    and what the other stream printed."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    kwargs = {"stdout": write_end, "stderr": subprocess.PIPE} if stream == "stdout" else {"stderr": write_end, "stdout": subprocess.PIPE}
    try:
        process = subprocess.Popen([sys.executable, "-m", "influence_cli", *args], cwd=cwd, env=env, **kwargs)
    finally:
        os.close(write_end)
    out, err = process.communicate(timeout=600)
    other = (err if stream == "stdout" else out) or b""
    return process.returncode, other.decode()


@pytest.mark.parametrize("args", [["config", "list"], ["config", "show"], ["--help"], ["score", "--help"]])
def test_closed_stdout_ends_quietly(tmp_path: Path, args: list[str]) -> None:
    code, stderr = run_into_closed_pipe(args, tmp_path)
    assert code == 141
    assert stderr == ""


def test_self_influence_csv_to_closed_stdout(tmp_path: Path) -> None:
    path = tiny_config(tmp_path)
    code, stderr = run_into_closed_pipe(["self-influence", "-c", str(path), "-o", "-"], tmp_path)
    assert code == 141, stderr
    assert "error" not in stderr and "BrokenPipe" not in stderr and "Traceback" not in stderr
    assert "examples" in stderr  # the table and summary went to stderr before the CSV
    assert (tmp_path / "runs" / "tiny" / "self_influence.csv").is_file()


def test_closed_stderr_ends_quietly(tmp_path: Path) -> None:
    code, stdout = run_into_closed_pipe(["trian"], tmp_path, stream="stderr")
    assert code == 141
    assert stdout == ""


def test_shell_pipeline_with_pipefail(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m influence_cli config list | head -1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.stdout.startswith("cifar10-resnet18")
    assert done.stderr == ""  # never "internal error: BrokenPipeError"
    assert done.returncode in (0, 141)  # 0 when head read everything before it exited
