"""A strategy defined in one file (scaled_identity.py, registered by importing it) is
picked up by the CLI, the config, the factor cache and evaluate without any other file
changing."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.config import load_config
from influence_cli.engine import fit_factors, load_factors, self_influence, unregister_strategy
from influence_cli.evaluation.common import default_strategies
from influence_cli.run import influence_hash
from engine_helpers import batches, make_data, make_mlp, seeded

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TINY = {
    "name": "tiny-toy",
    "seed": 0,
    "data": {"source": "synthetic", "synthetic": {"num_train": 40, "num_test": 8, "shape": [5], "num_classes": 3}},
    "model": {"arch": "mlp", "hidden_sizes": [4]},
    "train": {"epochs": 2, "batch_size": 20, "lr": 0.01, "device": "cpu"},
    "influence": {"batch_size": 20, "device": "cpu"},
}


@pytest.fixture
def toy():
    """Import (= register) the toy strategy; unregister it afterwards."""
    sys.modules.pop("scaled_identity", None)
    module = importlib.import_module("scaled_identity")
    yield module.ScaledIdentity
    unregister_strategy("scaled_identity")
    sys.modules.pop("scaled_identity", None)


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output": {"dir": str(tmp_path / "runs")}}))
    return path


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_not_registered_until_imported():
    assert "scaled_identity" not in default_strategies()


def test_cli_help_lists_it_when_imported_before_the_cli():
    code = "import sys, scaled_identity; from influence_cli.cli import main; sys.argv = ['infl', 'fit-factors', '--help']; main()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", proc.stdout))
    expected = "scaled_identity: identity preconditioner times a constant (a test fixture), settings in influence.scaled_identity"
    assert expected in shown


def test_cli_config_cache_and_evaluate_pick_it_up(toy, tiny):
    # evaluate's default set
    assert "scaled_identity" in default_strategies()
    # config: its own section, validated with the option's bound
    config = load_config(str(tiny))
    assert config.influence.strategy_options("scaled_identity") == {"scale": 2.0}
    assert load_config(str(tiny), ["influence.scaled_identity.scale=3"]).influence.scaled_identity.scale == 3.0
    bad = cli("config", "show", "-c", str(tiny), "--set", "influence.scaled_identity.scale=-1")
    assert bad.exit_code == 2 and "influence.scaled_identity.scale" in bad.output
    assert "scaled_identity:\n    scale: 2.0" in cli("config", "show", "-c", str(tiny)).output
    # cache hash: its option is part of its factors' hash, and only of its own
    three = load_config(str(tiny), ["influence.scaled_identity.scale=3"])
    assert influence_hash(config, "scaled_identity", "f") != influence_hash(three, "scaled_identity", "f")
    assert influence_hash(config, "identity", "f") == influence_hash(three, "identity", "f")
    # --strategy: fitted, reused, refused when its option changed
    first = cli("fit-factors", "-c", str(tiny), "-s", "scaled_identity")
    assert first.exit_code == 0 and "fitted scaled_identity" in first.output, first.output
    again = cli("fit-factors", "-c", str(tiny), "-s", "scaled_identity")
    assert again.exit_code == 0 and "reusing" in again.output
    stale = cli("fit-factors", "-c", str(tiny), "-s", "scaled_identity", "--set", "influence.scaled_identity.scale=3")
    assert stale.exit_code == 2 and "different data or influence settings" in stale.output
    # scores through the CLI: 3 × the identity's
    runs = tiny.parent / "runs" / "tiny-toy"
    for name, extra in (("identity", []), ("scaled_identity", ["--set", "influence.scaled_identity.scale=3"])):
        result = cli("self-influence", "-c", str(tiny), "-s", name, "--out", str(tiny.parent / f"{name}.csv"), *extra)
        assert result.exit_code == 0, result.output
    plain = pd.read_csv(tiny.parent / "identity.csv").sort_values("index")["self_influence"].to_numpy()
    scaled = pd.read_csv(tiny.parent / "scaled_identity.csv").sort_values("index")["self_influence"].to_numpy()
    assert abs(scaled / plain - 3.0).max() < 1e-4
    assert load_factors(runs / "factors" / "scaled_identity").strategy == "scaled_identity"


def test_library_scores_are_scale_times_identity(toy):
    model = seeded(make_mlp)
    x, y = make_data((6,), 12)
    loader = batches(x, y, 5)
    plain = self_influence(model, fit_factors(model, loader, "identity", dtype=torch.float64), loader)
    scaled = self_influence(model, fit_factors(model, loader, "scaled_identity", options={"scale": 0.5}), loader)
    torch.testing.assert_close(scaled, 0.5 * plain, rtol=1e-6, atol=0)
    with pytest.raises(Exception, match="scale"):
        fit_factors(model, loader, "scaled_identity", options={"scale": 0})
