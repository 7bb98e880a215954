"""`infl value` through the CLI: value.csv against the summed `score --matrix` rows, sort
order, --only-misclassified, ensembles, one-line errors and the report's gallery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from influence_cli.app.value import VALUE_COLUMNS
from influence_cli.cli import app

TINY = {
    "name": "tiny-value",
    "seed": 0,
    "data": {"source": "synthetic", "synthetic": {"num_train": 60, "num_test": 20, "shape": [5], "num_classes": 3}},
    "model": {"arch": "mlp", "hidden_sizes": [6]},
    "train": {"epochs": 3, "batch_size": 20, "lr": 0.01, "device": "cpu"},
    "influence": {"batch_size": 16, "device": "cpu", "dtype": "float64"},
}


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("value")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output": {"dir": str(root / "runs")}}))
    (root / "all.csv").write_text("index\n" + "".join(f"{i}\n" for i in range(20)))
    return path


def run_dir(config: Path, name: str = "tiny-value") -> Path:
    return config.parent / "runs" / name


def matrix_of(config: Path, csv: Path, *extra: str) -> tuple[np.ndarray, pd.DataFrame]:
    target = config.parent / f"{csv.stem}.safetensors"
    result = cli("score", str(csv), "-c", str(config), "--matrix", str(target), "--top", "1", *extra)
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(run_dir(config) / "scores" / f"{csv.stem}.csv", keep_default_na=False)
    return load_file(str(target))["scores"].double().numpy(), scores


def read_value(config: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir(config) / "value.csv", dtype={"id": str, "label": str, "predicted": str})


def test_value_csv_is_the_summed_matrix_most_harmful_first(tiny: Path) -> None:
    result = cli("value", "-c", str(tiny), "--top", "3")
    assert result.exit_code == 0, result.output
    assert "most harmful for the test split" in result.output and "most helpful" in result.output
    table = read_value(tiny)
    assert list(table.columns) == VALUE_COLUMNS
    assert table["rank"].tolist() == list(range(1, 61))
    assert (np.diff(table["value"].to_numpy()) >= 0).all()  # most harmful (most negative) first
    assert sorted(table["index"]) == list(range(60))
    assert np.isclose(table["share"].abs().sum(), 1.0)
    matrix, _ = matrix_of(tiny, tiny.parent / "all.csv")
    expected = matrix.sum(0)[table["index"].to_numpy()]
    assert np.allclose(table["value"].to_numpy(), expected, rtol=1e-5, atol=1e-8 * np.abs(expected).max())
    # the CSV form of the same rows gives the same file
    again = cli("value", str(tiny.parent / "all.csv"), "-c", str(tiny), "--out", str(tiny.parent / "copy.csv"))
    assert again.exit_code == 0, again.output
    copy = pd.read_csv(tiny.parent / "copy.csv", dtype={"id": str, "label": str, "predicted": str})
    assert np.allclose(copy["value"], read_value(tiny)["value"]) and copy["index"].tolist() == read_value(tiny)["index"].tolist()


def test_only_misclassified_is_the_sum_over_the_wrong_rows(tiny: Path) -> None:
    _, scores = matrix_of(tiny, tiny.parent / "all.csv")
    rows = scores.drop_duplicates("test_index").set_index("test_index").sort_index()
    wrong = (rows["test_label"] != rows["test_predicted"]).to_numpy()
    assert 0 < wrong.sum() < 20
    result = cli("value", "-c", str(tiny), "--only-misclassified", "--measurement", "margin")
    assert result.exit_code == 0, result.output
    assert "misclassified rows of the test split" in result.output
    margin, _ = matrix_of(tiny, tiny.parent / "all.csv", "--measurement", "margin")
    table = read_value(tiny)
    expected = margin[wrong].sum(0)[table["index"].to_numpy()]
    assert np.allclose(table["value"].to_numpy(), expected, rtol=1e-5, atol=1e-8 * np.abs(expected).max())


def test_ensemble_value_is_the_members_mean(tiny: Path) -> None:
    extra = ("--set", "influence.ensemble=2")
    result = cli("value", "-c", str(tiny), *extra)
    assert result.exit_code == 0, result.output
    table = read_value(tiny)
    matrix, _ = matrix_of(tiny, tiny.parent / "all.csv", *extra)  # the ensemble-averaged matrix
    expected = matrix.sum(0)[table["index"].to_numpy()]
    assert np.allclose(table["value"].to_numpy(), expected, rtol=1e-5, atol=1e-8 * np.abs(expected).max())


def test_stdout_and_the_report_gallery(tiny: Path) -> None:
    result = CliRunner().invoke(app, ["value", "-c", str(tiny), "--split", "train", "--out", "-"])
    assert result.exit_code == 0, result.output
    assert "rank,index,id,label,predicted,value,share" in result.stdout
    report = cli("report", "-c", str(tiny))
    assert report.exit_code == 0, report.output
    html = (run_dir(tiny) / "report.html").read_text()
    assert "Most harmful for the train split" in html
    harmful = read_value(tiny).query("value < 0")
    assert html.count('class="card harmful"') == min(24, len(harmful))


@pytest.mark.parametrize(
    "body, message",
    [
        ("index\n999\n", "out of range"),
        ("index\nx\n", "not an integer"),
        ("", "empty CSV"),
        ("wrong\n1\n", "missing columns"),
    ],
)
def test_bad_query_csv_is_one_line(tiny: Path, body: str, message: str) -> None:
    bad = tiny.parent / "bad.csv"
    bad.write_text(body)
    result = cli("value", str(bad), "-c", str(tiny))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_bad_options_are_one_line(tiny: Path) -> None:
    for args, message in ((("--split", "val"), "--split"), (("--measurement", "acc"), "--measurement"),
                          (("--strategy", "nope"), "--strategy")):
        result = cli("value", "-c", str(tiny), *args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_report_refuses_a_foreign_value_csv(tiny: Path) -> None:
    assert cli("value", "-c", str(tiny)).exit_code == 0
    path = run_dir(tiny) / "value.csv"
    table = read_value(tiny)
    table.loc[0, "index"] = 600  # not a row of this run's 60 training examples
    table.to_csv(path, index=False)
    result = cli("report", "-c", str(tiny))
    assert result.exit_code == 2 and "value.csv" in result.output and "rerun `infl value`" in result.output
    # one error line (an earlier info line such as "strategy: auto → exact (...)" may precede it)
    errors = [line for line in result.output.strip().splitlines() if not line.startswith("strategy: auto")]
    assert len(errors) == 1 and errors[0].startswith("error:") and "Traceback" not in result.output, result.output
    assert cli("value", "-c", str(tiny)).exit_code == 0  # a fresh ranking mends it
    assert cli("report", "-c", str(tiny)).exit_code == 0
