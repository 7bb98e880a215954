"""CLI behaviour through typer's CliRunner: exit codes, one-line errors, outputs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from influence_cli.cli import app

runner = CliRunner()


def invoke(*args: str) -> "object":
    return runner.invoke(app, list(args))


def write_config(tmp_path: Path, data: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_table(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    n = 60
    x = torch.randn(n, 3, generator=gen)
    y = (x[:, 0] > 0).long()
    frame = pd.DataFrame({"f1": x[:, 0], "f2": x[:, 1], "f3": x[:, 2], "label": ["yes" if v else "no" for v in y]})
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    return path


def table_config(tmp_path: Path, **extra: dict) -> dict:
    tiny_table(tmp_path)
    cfg = {
        "name": "tiny",
        "data": {"source": "table", "path": "rows.csv", "test_fraction": 0.25},
        "model": {"arch": "mlp", "hidden_sizes": [8]},
        "train": {"epochs": 20, "batch_size": 16, "lr": 0.01},
        "output": {"dir": str(tmp_path / "runs")},
    }
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def test_help_lists_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("train", "fit-factors", "self-influence", "config"):
        assert name in result.output


def test_unknown_key_exit_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"name": "x", "trainn": {"epochs": 1}})
    result = invoke("train", "-c", str(path))
    assert result.exit_code == 2
    assert f"{path}: trainn: unknown key" in result.output
    assert "Traceback" not in result.output


def test_wrong_type_exit_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"name": "x", "train": {"epochs": "ten"}})
    result = invoke("train", "-c", str(path))
    assert result.exit_code == 2
    assert "train.epochs" in result.output


def test_bad_override_exit_2() -> None:
    result = invoke("config", "show", "--set", "train.epochz=3")
    assert result.exit_code == 2
    assert "train.epochz: unknown key" in result.output


def test_missing_data_file_exit_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"name": "x", "data": {"source": "table", "path": "nothere.csv"}})
    result = invoke("train", "-c", str(path))
    assert result.exit_code == 2
    assert "nothere.csv" in result.output
    assert "Traceback" not in result.output


def test_bad_checkpoint_exit_2(tmp_path: Path) -> None:
    (tmp_path / "broken.pt").write_bytes(b"\x00garbage")
    path = write_config(tmp_path, table_config(tmp_path, model={"checkpoint": "broken.pt"}))
    result = invoke("train", "-c", str(path))
    assert result.exit_code == 2
    assert "broken.pt" in result.output and "cannot read checkpoint" in result.output


def test_config_list_and_show() -> None:
    listed = invoke("config", "list")
    assert listed.exit_code == 0 and "digits-mlp (default)" in listed.output
    shown = invoke("config", "show", "-c", "digits-cnn", "--set", "train.epochs=2")
    assert shown.exit_code == 0
    data = yaml.safe_load(shown.stdout)
    assert data["name"] == "digits-cnn" and data["train"]["epochs"] == 2


def test_train_then_reuse(tmp_path: Path) -> None:
    path = write_config(tmp_path, table_config(tmp_path))
    first = invoke("train", "-c", str(path))
    assert first.exit_code == 0, first.output
    assert "model: trained" in first.output
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoint.safetensors"
    assert checkpoint.is_file()
    assert (tmp_path / "runs" / "tiny" / "config.yaml").is_file()
    second = invoke("train", "-c", str(path))
    assert second.exit_code == 0 and "loaded checkpoint" in second.output
    changed = invoke("train", "-c", str(path), "--set", "train.epochs=3")
    assert changed.exit_code == 0 and "model: trained" in changed.output
