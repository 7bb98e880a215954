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
        # these tests exercise the ekfac pipeline (its paths and messages); auto: tests/test_defaults.py
        "influence": {"strategy": "ekfac"},
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


def test_fit_factors_reuse_and_stale(tmp_path: Path) -> None:
    path = write_config(tmp_path, table_config(tmp_path))
    first = invoke("fit-factors", "-c", str(path))
    assert first.exit_code == 0, first.output
    assert "fitted ekfac" in first.output
    meta = tmp_path / "runs" / "tiny" / "factors" / "ekfac" / "meta.json"
    assert meta.is_file()
    again = invoke("fit-factors", "-c", str(path))
    assert again.exit_code == 0 and "reusing" in again.output
    stale = invoke("fit-factors", "-c", str(path), "--set", "train.epochs=3")
    assert stale.exit_code == 2
    assert "different checkpoint" in stale.output and "--overwrite" in stale.output
    refit = invoke("fit-factors", "-c", str(path), "--set", "train.epochs=3", "--overwrite")
    assert refit.exit_code == 0 and "fitted ekfac" in refit.output
    bad = invoke("fit-factors", "-c", str(path), "--strategy", "magic")
    assert bad.exit_code == 2 and "unknown strategy 'magic'" in bad.output


def test_self_influence_outputs(tmp_path: Path) -> None:
    path = write_config(tmp_path, table_config(tmp_path, audit={"score": "self_influence"}))
    out = tmp_path / "ranking.csv"
    result = invoke("self-influence", "-c", str(path), "--top", "5", "--out", str(out), "--strategy", "kfac")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    table = pd.read_csv(run / "self_influence.csv", keep_default_na=False)
    assert list(table.columns) == [
        "rank", "index", "id", "label", "label_name", "predicted", "predicted_name",
        "label_prob", "loss", "self_influence", "flagged", "suggested_label", "score",
    ]
    assert table["self_influence"].is_monotonic_decreasing and table["score"].equals(table["self_influence"])
    assert len(table) == 45 and sorted(table["index"]) == list(range(45))
    assert (table["self_influence"] >= 0).all()
    assert set(table["label_name"]) <= {"no", "yes"}
    mislabels = pd.read_csv(run / "mislabels.csv", keep_default_na=False)
    assert len(mislabels) == int(table["flagged"].sum())
    assert pd.read_csv(out).equals(pd.read_csv(run / "self_influence.csv"))
    assert (run / "summary.json").is_file()
    assert "examples" in result.output and "flagged" in result.output


@pytest.mark.parametrize("strategy", ["ekfac", "exact"])
def test_reused_model_ranks_with_the_probabilities_of_one_forward_pass(
    tmp_path: Path, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first run predicts after training; a second reuses the checkpoint and takes the
    probabilities from the mislabel loop's forward pass: same table, accuracies from train.json."""
    import influence_cli.app.model as model_stage
    import influence_cli.app.scores as score_stage

    cfg = write_config(tmp_path, table_config(tmp_path, influence={"strategy": strategy}))
    first = invoke("self-influence", "-c", str(cfg))
    assert first.exit_code == 0, first.output
    out = tmp_path / "runs" / "tiny" / "self_influence.csv"
    before = pd.read_csv(out)
    predicted: list[int] = []

    def counting(model, dataset, **kw):
        predicted.append(len(dataset))
        return real(model, dataset, **kw)

    real = model_stage.predict_probs
    monkeypatch.setattr(model_stage, "predict_probs", counting)
    monkeypatch.setattr(score_stage, "predict_probs", counting)
    second = invoke("self-influence", "-c", str(cfg))
    assert second.exit_code == 0, second.output
    assert predicted == []  # no separate prediction pass over either split
    after = pd.read_csv(out)
    assert list(after["index"]) == list(before["index"]) and list(after["predicted"]) == list(before["predicted"])
    assert (after["label_prob"] - before["label_prob"]).abs().max() < 1e-6
    accuracy = [line for line in first.output.splitlines() if "train accuracy" in line]
    assert accuracy and accuracy[-1].split("train accuracy")[1] in second.output


def test_score_command(tmp_path: Path) -> None:
    path = write_config(tmp_path, table_config(tmp_path))
    queries = tmp_path / "queries.csv"
    queries.write_text("index,label\n0,yes\n1,\n")
    result = invoke("score", str(queries), "-c", str(path), "--top", "3", "--matrix", str(tmp_path / "m.safetensors"))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "runs" / "tiny" / "scores" / "queries.csv", keep_default_na=False)
    assert list(table.columns) == [
        "test_id", "test_index", "test_label", "test_predicted", "rank", "train_index", "train_id", "train_label",
        "influence", "role",
    ]
    first_rows = table.drop_duplicates("test_id")
    assert list(first_rows["test_index"]) == [0, 1]  # the index the user wrote, next to the id
    assert all(str(i).startswith("test/") for i in first_rows["test_id"])
    assert "index 0" in result.stderr and "index 1" in result.stderr  # shown in the table too
    assert set(table["role"]) <= {"proponent", "opponent"}
    assert (table[table["role"] == "proponent"]["influence"] > 0).all()
    assert (table[table["role"] == "opponent"]["influence"] < 0).all()
    assert table.groupby(["test_id", "role"]).size().max() <= 3
    assert "had no label" in result.output
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as handle:
        matrix = handle.get_tensor("scores")
        assert matrix.shape == (2, 45)
        assert "train_ids" in handle.metadata()
    top = table[(table["test_id"] == table["test_id"].iloc[0]) & (table["role"] == "proponent")]
    assert top["influence"].iloc[0] == pytest.approx(float(matrix[0].max()), rel=1e-5)
    bad = tmp_path / "bad.csv"
    bad.write_text("index\n500\n")
    result = invoke("score", str(bad), "-c", str(path))
    assert result.exit_code == 2 and "row 1 (line 2): index 500 is out of range" in result.output


def test_check_exit_codes_junit_markdown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import xml.etree.ElementTree as ET

    path = write_config(tmp_path, table_config(tmp_path, audit={"flag": {"rule": "top_fraction", "fraction": 0.2, "require_disagreement": False}}))
    summary = tmp_path / "step_summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    failed = invoke("check", "-c", str(path), "--max-flagged", "2", "--junit", str(tmp_path / "j.xml"), "--write-baseline", str(tmp_path / "base.csv"))
    assert failed.exit_code == 1, failed.output
    root = ET.parse(tmp_path / "j.xml").getroot()
    assert root.get("failures") == "1"
    assert "infl check" in summary.read_text()
    check_csv = pd.read_csv(tmp_path / "runs" / "tiny" / "check.csv")
    assert len(check_csv) == 9  # ceil(0.2 * 45)
    passed = invoke("check", "-c", str(path), "--max-flagged", "0", "--baseline", str(tmp_path / "base.csv"), "--markdown", str(tmp_path / "s.md"))
    assert passed.exit_code == 0, passed.output
    assert "passed" in (tmp_path / "s.md").read_text()
    assert summary.read_text().count("## infl check") == 2
    missing = invoke("check", "-c", str(path), "--baseline", str(tmp_path / "nothere.csv"))
    assert missing.exit_code == 2 and "baseline file not found" in missing.output


def test_report_command(tmp_path: Path) -> None:
    path = write_config(tmp_path, table_config(tmp_path))
    result = invoke("report", "-c", str(path), "--top", "5")
    assert result.exit_code == 0, result.output
    html_text = (tmp_path / "runs" / "tiny" / "report.html").read_text()
    assert "<html" in html_text.lower() and "f1" in html_text


@pytest.mark.parametrize(
    "override,expected",
    [
        ("influence.strategy=ekfak", "influence.strategy: unknown strategy 'ekfak' (did you mean ekfac?)"),
        ("model.arch=resnet1", "model.arch: unknown architecture 'resnet1'"),
        ("train.epochs=0", "train.epochs: 0 is out of range; use a number >= 1"),
    ],
)
def test_every_command_validates_the_whole_config_before_working(tmp_path: Path, override: str, expected: str) -> None:
    path = write_config(tmp_path, table_config(tmp_path))
    queries = tmp_path / "queries.csv"
    queries.write_text("index\n0\n")
    for command in (["train"], ["fit-factors"], ["self-influence"], ["score", str(queries)], ["check"], ["report"],
                    ["evaluate"], ["merge"], ["config", "show"]):
        result = invoke(*command, "-c", str(path), "--set", override)
        assert result.exit_code == 2, (command, result.output)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {expected}"), (command, result.stderr)
        assert not (tmp_path / "runs").exists(), command  # nothing was trained or written


def test_check_output_with_and_without_baseline(tmp_path: Path) -> None:
    flag = {"flag": {"rule": "top_fraction", "fraction": 0.2, "require_disagreement": False}}
    path = write_config(tmp_path, table_config(tmp_path, audit=flag))
    check_csv = tmp_path / "runs" / "tiny" / "check.csv"

    plain = invoke("check", "-c", str(path), "--write-baseline", str(tmp_path / "all.csv"))
    assert plain.exit_code == 1, plain.output  # 9 of 45 flagged > the 2 % default
    lines = [line.strip() for line in plain.stderr.splitlines()]
    assert "tiny: flagged examples" in lines  # no baseline: no "not in the baseline"
    assert "9 of 45 training examples flagged · showing the top 9" in lines  # the whole training set
    assert f"45 examples, 9 flagged → {check_csv}" in lines
    assert "in the baseline" not in plain.stderr and "accepted" not in plain.stderr

    accepted = pd.read_csv(tmp_path / "all.csv", keep_default_na=False).head(4)
    accepted.to_csv(tmp_path / "some.csv", index=False)
    partial = invoke("check", "-c", str(path), "--baseline", str(tmp_path / "some.csv"))
    assert partial.exit_code == 1, partial.output
    lines = [line.strip() for line in partial.stderr.splitlines()]
    assert "tiny: flagged examples not in the baseline" in lines
    caption = "9 of 45 training examples flagged, 4 accepted in the baseline · showing the top 5"
    assert caption in " ".join(partial.stderr.split())  # the caption wraps to the table's width
    assert f"45 examples, 9 flagged: 4 accepted in the baseline, 5 new (counted) → {check_csv}" in lines
    assert len(pd.read_csv(check_csv)) == 5

    everything = invoke("check", "-c", str(path), "--baseline", str(tmp_path / "all.csv"), "--markdown", str(tmp_path / "s.md"))
    assert everything.exit_code == 0, everything.output
    assert f"45 examples, 9 flagged: 9 accepted in the baseline, 0 new (counted) → {check_csv}" in everything.stderr
    assert "- flagged: 9 (9 accepted in the baseline, 0 new)" in (tmp_path / "s.md").read_text()
    invoke("check", "-c", str(path), "--markdown", str(tmp_path / "plain.md"))
    assert "- flagged: 9\n" in (tmp_path / "plain.md").read_text()


def test_score_test_index_with_ids_and_features(tmp_path: Path) -> None:
    path = write_config(tmp_path, table_config(tmp_path))
    named = tmp_path / "named.csv"
    named.write_text("index,id,label\n7,query-a,yes\n3,query-b,no\n")
    result = invoke("score", str(named), "-c", str(path), "--top", "2", "-o", str(tmp_path / "named-out.csv"))
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "named-out.csv").read_text().splitlines()
    assert lines[0].startswith("test_id,test_index,test_label,test_predicted,rank,")
    table = pd.read_csv(tmp_path / "named-out.csv", keep_default_na=False).drop_duplicates("test_id")
    assert list(zip(table["test_id"], table["test_index"])) == [("query-a", 7), ("query-b", 3)]
    features = tmp_path / "features.csv"
    features.write_text("f1,f2,f3\n0.5,0.1,-0.2\n")
    result = invoke("score", str(features), "-c", str(path), "--top", "2", "-o", str(tmp_path / "features-out.csv"))
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "features-out.csv").read_text().splitlines()[1:]
    assert rows and all(row.split(",")[:2] == ["0", ""] for row in rows)  # id 0, no test_index
