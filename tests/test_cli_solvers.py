"""exact and lissa through the CLI: fitting, reuse, refusal messages, warnings, scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.config import load_config
from influence_cli.engine import ExactSolver, load_factors
from influence_cli.app import Session, ensure_model
from influence_cli.progress import Reporter

CONFIG = {
    "name": "tiny-solvers",
    "seed": 0,
    "data": {"source": "synthetic", "synthetic": {"num_train": 80, "num_test": 12, "shape": [6], "num_classes": 3}},
    "model": {"arch": "mlp", "hidden_sizes": [5]},
    "train": {"epochs": 5, "batch_size": 16, "lr": 0.01},
    "influence": {"batch_size": 32},
    "audit": {"score": "self_influence"},  # these tests check each solver's self-influence ranking
}


def setup(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "output": {"dir": str(tmp_path / "runs")}}))
    return path


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_exact_fit_reuse_and_self_influence(tmp_path):
    config = setup(tmp_path)
    first = run("fit-factors", "-c", str(config), "-s", "exact")
    assert first.exit_code == 0, first.output
    assert "fitted exact" in first.output
    again = run("fit-factors", "-c", str(config), "-s", "exact")
    assert again.exit_code == 0 and "reusing" in again.output
    stored = load_factors(tmp_path / "runs" / "tiny-solvers" / "factors" / "exact")
    assert isinstance(stored, ExactSolver) and stored.num_params == (6 + 1) * 5 + (5 + 1) * 3

    result = run("self-influence", "-c", str(config), "-s", "exact", "--top", "3")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "runs" / "tiny-solvers" / "self_influence.csv")
    assert len(table) == 80 and (table["self_influence"] > 0).all()
    assert table["self_influence"].is_monotonic_decreasing

    # A different solver setting makes the stored factors stale: fit-factors refuses them.
    stale = run("fit-factors", "-c", str(config), "-s", "exact", "--set", "influence.exact.curvature=hessian")
    assert stale.exit_code == 2
    assert "different data or influence settings" in stale.output and "--overwrite" in stale.output


def test_exact_refuses_large_model_with_one_line(tmp_path):
    config = setup(tmp_path)
    result = run("self-influence", "-c", str(config), "-s", "exact", "--set", "influence.exact.max_params=50")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    error = [line for line in lines if "error" in line]
    assert error and "max_params" in result.output and "53" in result.output
    assert "Traceback" not in result.output


def test_lissa_scores_match_exact_when_converged(tmp_path):
    config = setup(tmp_path)
    rows = tmp_path / "rows.csv"
    rows.write_text("index\n0\n1\n2\n")
    common = ["-c", str(config), "--top", "80", "--set", "influence.damping=0.5", "--set", "influence.lissa.batch_size=80"]
    exact = run("score", str(rows), "-s", "exact", "--out", str(tmp_path / "exact.csv"), *common)
    assert exact.exit_code == 0, exact.output
    lissa = run(
        "score", str(rows), "-s", "lissa", "--out", str(tmp_path / "lissa.csv"), *common,
        "--set", "influence.lissa.depth=2000",
    )
    assert lissa.exit_code == 0, lissa.output
    a = pd.read_csv(tmp_path / "exact.csv").sort_values(["test_id", "train_index"])
    b = pd.read_csv(tmp_path / "lissa.csv").sort_values(["test_id", "train_index"])
    assert list(a["train_index"]) == list(b["train_index"])
    rel = np.abs(a["influence"].to_numpy() - b["influence"].to_numpy()).max() / np.abs(a["influence"]).max()
    assert rel < 1e-2


def test_lissa_warns_when_depth_cannot_converge(tmp_path):
    config = setup(tmp_path)
    rows = tmp_path / "rows.csv"
    rows.write_text("index\n0\n")
    result = run(
        "score", str(rows), "-c", str(config), "-s", "lissa",
        "--set", "influence.lissa.depth=5", "--set", "influence.damping=0.001",
    )
    assert result.exit_code == 0, result.output
    assert "unreached" in result.output and "influence.lissa.depth" in result.output


def test_lissa_divergence_is_one_line_with_advice(tmp_path):
    config = setup(tmp_path)
    rows = tmp_path / "rows.csv"
    rows.write_text("index\n0\n")
    result = run(
        "score", str(rows), "-c", str(config), "-s", "lissa",
        "--set", "influence.lissa.scale=0.0001", "--set", "influence.lissa.depth=200",
    )
    assert result.exit_code == 2
    assert "LiSSA diverged" in result.output and "influence.lissa.scale" in result.output
    assert "Traceback" not in result.output


def test_bad_solver_settings_are_config_errors(tmp_path):
    config = setup(tmp_path)
    for key, value in (("influence.lissa.scale", "-1"), ("influence.exact.curvature", "newton"),
                       ("influence.damping_factor", "0"), ("influence.damping_scope", "model")):
        result = run("config", "show", "-c", str(config), "--set", f"{key}={value}")
        assert result.exit_code == 2, (key, result.output)
        assert key in result.output
    cfg = load_config(str(config), ["influence.lissa.scale=2.5"])
    assert cfg.influence.lissa.scale == 2.5
    state = ensure_model(Session(cfg, Reporter()))
    assert isinstance(state.model, torch.nn.Module)
