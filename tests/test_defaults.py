"""influence.strategy: auto, influence.damping: tuned and audit.score through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from influence_cli.app.choice import auto_choice
from influence_cli.cli import app
from test_cli import table_config, write_config

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_auto_rule_threshold() -> None:
    assert auto_choice(20000, 20000).strategy == "exact"
    assert auto_choice(20001, 20000).strategy == "ekfac"
    assert "20,001 tracked parameters > influence.exact.max_params = 20,000" in auto_choice(20001, 20000).reason
    assert auto_choice(9610, 20000, 1437).strategy == "exact"  # digits-mlp
    slow = auto_choice(9610, 20000, 60000)  # the same model on 60,000 examples: N·P² = 5.5e12
    assert slow.strategy == "ekfac" and "too long" in slow.reason


@pytest.mark.parametrize("max_params, expected", [(20000, "exact"), (50, "ekfac")])
def test_auto_picks_by_tracked_parameters(tmp_path: Path, max_params: int, expected: str) -> None:
    # 3 features → 8 hidden → 2 classes: 3·8 + 8 + 8·2 + 2 = 50 tracked parameters; max_params 49 is below
    cfg = write_config(tmp_path, table_config(tmp_path, influence={"strategy": "auto", "exact": {"max_params": max_params - 1 if expected == "ekfac" else max_params}}))
    result = invoke("fit-factors", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    assert f"strategy: auto → {expected} (50 tracked parameters" in result.output
    meta = json.loads((tmp_path / "runs" / "tiny" / "factors" / expected / "meta.json").read_text())
    assert meta["strategy_choice"]["strategy"] == expected and meta["strategy_choice"]["requested"] == "auto"
    assert meta["strategy_choice"]["tracked_parameters"] == 50
    assert not (tmp_path / "runs" / "tiny" / "factors" / ({"exact", "ekfac"} - {expected}).pop()).exists()


def test_strategy_option_overrides_auto(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, table_config(tmp_path, influence={"strategy": "auto"}))
    result = invoke("fit-factors", "-c", str(cfg), "--strategy", "kfac")
    assert result.exit_code == 0, result.output
    assert "strategy: auto" not in result.output
    assert (tmp_path / "runs" / "tiny" / "factors" / "kfac" / "meta.json").is_file()
    assert not (tmp_path / "runs" / "tiny" / "factors" / "exact").exists()


def test_auto_and_explicit_exact_share_the_factor_cache(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, table_config(tmp_path, influence={"strategy": "auto"}))
    assert invoke("fit-factors", "-c", str(cfg)).exit_code == 0
    again = invoke("fit-factors", "-c", str(cfg), "--set", "influence.strategy=exact")
    assert again.exit_code == 0 and "factors: reusing" in again.output


def tuned(tmp_path: Path, **extra) -> Path:
    data = table_config(tmp_path, **extra)
    return write_config(tmp_path, data)


def test_tuned_damping_is_used_and_invalidated(tmp_path: Path) -> None:
    cfg = tuned(tmp_path, influence={"damping": "tuned", "strategy": "ekfac"})
    missing = invoke("self-influence", "-c", str(cfg))
    assert missing.exit_code == 2 and "holds no tuned damping for ekfac" in missing.output
    assert "infl evaluate --lds --tune-damping -s ekfac" in missing.output
    result = invoke("evaluate", "-c", str(cfg), "--tune-damping", "--grid", "0.1,1,10", "--tune-subsets", "4",
                    "--test-rows", "10")
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "runs" / "tiny" / "damping.json").read_text())["ekfac"]
    grid = {p["damping_factor"]: p["mean"] for p in stored["grid"]}
    assert set(grid) == {0.1, 1.0, 10.0}
    assert stored["best_factor"] == max(grid, key=grid.get)
    assert "best: damping_factor" in result.output
    ok = invoke("self-influence", "-c", str(cfg))
    assert ok.exit_code == 0, ok.output
    # the same fit with the factor spelled out is the same cached factors
    explicit = invoke("fit-factors", "-c", str(cfg), "--set", "influence.damping=auto",
                      "--set", f"influence.damping_factor={stored['best_factor']}")
    assert explicit.exit_code == 0 and "factors: reusing" in explicit.output
    # another model (more epochs: retrained) refuses the stale tuning
    changed = invoke("self-influence", "-c", str(cfg), "--set", "train.epochs=21")
    assert changed.exit_code == 2 and "was tuned on another model" in changed.output


@pytest.mark.parametrize("score", ["loss", "loo_margin"])
def test_audit_score_ranks_and_keeps_self_influence(tmp_path: Path, score: str) -> None:
    cfg = tuned(tmp_path, audit={"score": score}, influence={"strategy": "ekfac"})
    result = invoke("self-influence", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "runs" / "tiny" / "self_influence.csv")
    assert list(table.columns)[-2:] == ["suggested_label", "score"] and "self_influence" in table.columns
    assert table["score"].is_monotonic_decreasing
    if score == "loss":
        assert (table["score"] - table["loss"]).abs().max() < 1e-5
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["run"]["score"] == score


def test_shards_merge_to_the_same_score_ranking(tmp_path: Path) -> None:
    cfg = tuned(tmp_path, audit={"score": "loo_margin"}, influence={"strategy": "ekfac"})
    assert invoke("self-influence", "-c", str(cfg)).exit_code == 0
    whole = pd.read_csv(tmp_path / "runs" / "tiny" / "self_influence.csv")
    for i in range(2):
        shard = invoke("self-influence", "-c", str(cfg), "--shard", f"{i}/2")
        assert shard.exit_code == 0, shard.output
    merged = invoke("merge", "-c", str(cfg))
    assert merged.exit_code == 0, merged.output
    again = pd.read_csv(tmp_path / "runs" / "tiny" / "self_influence.csv")
    assert list(again["index"]) == list(whole["index"])
    # float32 scores of other batch compositions: equal to rounding
    assert (again["score"] - whole["score"]).abs().max() < 1e-5 * whole["score"].abs().max()
