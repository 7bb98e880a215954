"""`infl evaluate --value K`: K parsing, the two halves of the test split, and the
retrain-without evaluation end to end on a tiny run (checked against `infl value`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.errors import InflError
from influence_cli.evaluation.value import METHODS, parse_k, split_halves

TINY = {
    "name": "tiny-eval-value",
    "seed": 3,
    "data": {"source": "synthetic", "synthetic": {"num_train": 50, "num_test": 15, "shape": [4], "num_classes": 3}},
    "model": {"arch": "mlp", "hidden_sizes": [5]},
    "train": {"epochs": 2, "batch_size": 25, "lr": 0.01, "device": "cpu"},
    "influence": {"batch_size": 25, "device": "cpu", "dtype": "float64"},
}


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("text, k", [("7", 7), ("0.1", 10), ("10%", 10), ("0.02", 2), ("1", 1), ("99", 99)])
def test_parse_k(text: str, k: int) -> None:
    assert parse_k(text, 100) == k


@pytest.mark.parametrize("text", ["0", "100", "1.5", "abc", "150%", "0.001", "-3"])
def test_parse_k_refuses(text: str) -> None:
    with pytest.raises(InflError, match="--value"):
        parse_k(text, 100)


@pytest.mark.parametrize("rows", [2, 15, 360])
def test_split_halves(rows: int) -> None:
    val, held = split_halves(rows, 0)
    assert len(val) == (rows + 1) // 2 and len(val) + len(held) == rows
    assert not set(val) & set(held) and sorted([*val, *held]) == list(range(rows))
    again_val, _ = split_halves(rows, 0)
    assert (again_val == val).all()
    assert rows < 10 or not (split_halves(rows, 1)[0] == val).all()
    with pytest.raises(InflError):
        split_halves(1, 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalvalue")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output": {"dir": str(root / "runs")}}))
    return path


def test_evaluate_value_end_to_end(tiny: Path) -> None:
    result = cli("evaluate", "-c", str(tiny), "--value", "3", "--value", "0.1", "--seeds", "2", "--noise", "0.2")
    assert result.exit_code == 0, result.output
    assert "most harmful" in result.output and "held-out" in result.output
    run = tiny.parent / "runs" / "tiny-eval-value-noise0.2-uniform"
    out = json.loads((run / "value_evaluation.json").read_text())
    assert [r["k"] for r in out["removals"]] == [3, 5] and out["seeds"] == [3, 4]
    assert out["validation_rows"] == 8 and out["heldout_rows"] == 7 and out["noise"]["flipped"] == 10
    assert out["retraining"]["trained_now"] == 2 * (1 + 2 * len(METHODS))
    for removal in out["removals"]:
        for method in METHODS:
            entry = removal[method]
            assert len(entry["dropped"]) == removal["k"]
            assert len(set(entry["dropped"])) == removal["k"] and max(entry["dropped"]) < 50
            assert entry["heldout_loss"]["std"] > 0  # two seeds, two different models
    # the full-data model at the config's seed is the pipeline's model: its accuracy on the
    # two halves together is the run's test accuracy
    train_json = json.loads((run / "train.json").read_text())
    # the two-seed result averages seeds 3 and 4; the pipeline model is seed 3 alone
    single = cli("evaluate", "-c", str(tiny), "--value", "3", "--noise", "0.2")
    assert single.exit_code == 0, single.output
    one = json.loads((run / "value_evaluation.json").read_text())
    assert one["retraining"]["trained_now"] == 0  # every retraining reused from the cache
    acc = (8 * one["full"]["validation_accuracy"]["mean"] + 7 * one["full"]["heldout_accuracy"]["mean"]) / 15
    assert abs(acc - train_json["test_accuracy"]) < 1e-6, (acc, train_json["test_accuracy"])
    # most harmful = the first K of `infl value` on the validation half, as an index CSV
    val, _ = split_halves(15, 3)
    csv = tiny.parent / "val.csv"
    csv.write_text("index\n" + "".join(f"{i}\n" for i in val))
    noisy = tiny.parent / "noisy.yaml"
    noisy.write_text(yaml.safe_dump({**yaml.safe_load(tiny.read_text()), "name": "tiny-eval-value-noise0.2-uniform",
                                     "data": {**TINY["data"], "label_noise": {"fraction": 0.2, "kind": "uniform", "seed": 3}}}))
    valued = cli("value", str(csv), "-c", str(noisy))
    assert valued.exit_code == 0, valued.output
    table = pd.read_csv(run / "value.csv")
    for removal in out["removals"]:
        assert removal["most_harmful"]["dropped"] == sorted(table["index"][: removal["k"]].tolist())


def test_evaluate_value_bad_k_is_one_line(tiny: Path) -> None:
    result = cli("evaluate", "-c", str(tiny), "--value", "2.5")
    assert result.exit_code == 2 and "--value" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
