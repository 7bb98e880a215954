"""`infl fix` and `infl evaluate --fix` through the CLI; label overrides; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.evaluation.fixing import checked_rows, flips_found

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def noisy_config(tmp_path: Path, name: str = "noisy") -> Path:
    cfg = {
        "name": name,
        "data": {"source": "synthetic", "synthetic": {"num_train": 150, "num_test": 60, "shape": [6], "num_classes": 3,
                                                      "separation": 3.0},
                 "label_noise": {"fraction": 0.1}},
        "model": {"arch": "mlp", "hidden_sizes": [8]},
        "train": {"epochs": 15, "batch_size": 32, "lr": 0.01},
        "influence": {"batch_size": 64},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in text, text


@pytest.fixture
def audited(tmp_path: Path):
    path = noisy_config(tmp_path)
    result = invoke("self-influence", "-c", str(path))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "noisy"
    flagged = pd.read_csv(run / "mislabels.csv", keep_default_na=False, dtype=str)
    assert len(flagged) > 0
    return path, run, flagged


def test_fix_flagged_relabels_and_writes_its_outputs(audited) -> None:
    path, run, flagged = audited
    result = invoke("fix", "-c", str(path), "--flagged")
    assert result.exit_code == 0, result.output
    assert "step scale" in result.output and "examples changed" in result.output
    summary = json.loads((run / "fix.json").read_text())
    changed = flagged[flagged["suggested_label"] != flagged["label_name"]]
    assert summary["examples_changed"] == len(changed) and summary["action"] == "relabel"
    assert 0 <= summary["step_scale"] <= 1
    assert summary["objective_after"] <= summary["objective_before"]
    overrides = pd.read_csv(run / "label_overrides.csv", keep_default_na=False, dtype=str)
    assert sorted(overrides["id"]) == sorted(changed["id"])
    want = dict(zip(changed["id"], changed["suggested_label"]))
    assert all(want[i] == lab for i, lab in zip(overrides["id"], overrides["label"]))
    assert (run / "fixed.safetensors").is_file()
    assert [e["id"] for e in summary["examples"]] == list(changed["id"])


def test_fix_on_an_ensemble_corrects_its_first_member(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    path = noisy_config(tmp_path, "ens")
    assert invoke("self-influence", "-c", str(path), "--set", "influence.ensemble=2").exit_code == 0
    run = tmp_path / "runs" / "ens"
    flagged = pd.read_csv(run / "mislabels.csv", keep_default_na=False, dtype=str)
    rows = tmp_path / "rows.csv"
    flagged[["id", "suggested_label"]].rename(columns={"suggested_label": "new_label"}).to_csv(rows, index=False)
    result = invoke("fix", "-c", str(path), "--set", "influence.ensemble=2", "--from", str(rows), "--out", str(tmp_path / "a.safetensors"))
    assert result.exit_code == 0, result.output
    assert "corrects member 1 of 2" in result.output
    # the same rows fixed on a one-model run (member 1 is that model) give the same weights
    single = invoke("fix", "-c", str(path), "--from", str(rows), "--out", str(tmp_path / "b.safetensors"))
    assert single.exit_code == 0, single.output
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_label_overrides_change_the_training_labels_and_fingerprint(audited, tmp_path: Path) -> None:
    from influence_cli.app import Session
    from influence_cli.config import load_config
    from influence_cli.progress import Reporter

    path, run, _flagged = audited
    assert invoke("fix", "-c", str(path), "--flagged").exit_code == 0
    overrides = pd.read_csv(run / "label_overrides.csv", keep_default_na=False, dtype=str)
    plain = Session(load_config(str(path), []), Reporter()).data()
    fixed = Session(load_config(str(path), [f"data.label_overrides={run / 'label_overrides.csv'}"]), Reporter()).data()
    names = plain.class_names
    rows = [plain.train.ids.index(i) for i in overrides["id"]]
    assert [names[int(fixed.train.labels[k])] for k in rows] == list(overrides["label"])
    others = np.setdiff1d(np.arange(len(plain.train)), rows)
    assert np.array_equal(fixed.train.labels.numpy()[others], plain.train.labels.numpy()[others])
    assert fixed.fingerprint("train") != plain.fingerprint("train")
    trained = invoke("train", "-c", str(path), "--set", f"data.label_overrides={run / 'label_overrides.csv'}",
                     "--set", "name=noisy-fixed")
    assert trained.exit_code == 0, trained.output


def test_fix_from_file_remove_with_verify(audited, tmp_path: Path) -> None:
    path, run, flagged = audited
    listing = tmp_path / "drop.csv"
    flagged[["id"]].head(5).to_csv(listing, index=False)
    out = tmp_path / "out" / "corrected.safetensors"
    result = invoke("fix", "-c", str(path), "--from", str(listing), "--action", "remove", "--verify", "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "fix.json").read_text())
    verify = summary["verify"]
    assert summary["examples_changed"] == min(5, len(flagged)) and summary["action"] == "remove"
    assert 0 <= verify["agreement"] <= 1 and verify["relative_distance"] > 0
    assert summary["train"]["before"]["accuracy"] >= 0 and summary["outputs"]["label_overrides"] is None
    assert out.is_file() and not (run / "label_overrides.csv").exists()
    assert "retrained: test accuracy" in result.output


def test_from_an_edited_mislabels_csv(audited, tmp_path: Path) -> None:
    """--from mislabels.csv after review: its suggested_label column gives the new labels;
    a row whose suggestion is the given label changes nothing."""
    path, run, flagged = audited
    edited = flagged.copy()
    edited.loc[edited.index[0], "suggested_label"] = edited["label_name"].iloc[0]  # reviewer: label was right
    listing = tmp_path / "reviewed.csv"
    edited.to_csv(listing, index=False)
    result = invoke("fix", "-c", str(path), "--from", str(listing))
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "fix.json").read_text())
    kept = edited[edited["suggested_label"] != edited["label_name"]]
    assert [e["id"] for e in summary["examples"]] == list(kept["id"])
    assert [e["new_label"] for e in summary["examples"]] == list(kept["suggested_label"])


def test_finetune_steps_are_applied(audited) -> None:
    path, run, _flagged = audited
    assert invoke("fix", "-c", str(path), "--flagged", "--finetune-steps", "3").exit_code == 0
    assert json.loads((run / "fix.json").read_text())["finetune_steps"] == 3


def test_bad_inputs_are_one_line_errors(audited, tmp_path: Path) -> None:
    path, run, flagged = audited
    bad_id = tmp_path / "bad_id.csv"
    bad_id.write_text("id,new_label\nnot-an-id,0\n")
    one_line_error(invoke("fix", "-c", str(path), "--from", str(bad_id)), "not-an-id", "not a training example")
    bad_label = tmp_path / "bad_label.csv"
    bad_label.write_text(f"id,new_label\n{flagged['id'].iloc[0]},zebra\n")
    one_line_error(invoke("fix", "-c", str(path), "--from", str(bad_label)), "unknown label 'zebra'")
    empty = tmp_path / "empty.csv"
    empty.write_text("id,new_label\n")
    one_line_error(invoke("fix", "-c", str(path), "--from", str(empty)), "empty set")
    no_id = tmp_path / "no_id.csv"
    no_id.write_text("name,new_label\na,0\n")
    one_line_error(invoke("fix", "-c", str(path), "--from", str(no_id)), "no 'id' column")
    one_line_error(invoke("fix", "-c", str(path), "--flagged", "--from", str(empty)), "--flagged and --from")
    one_line_error(invoke("fix", "-c", str(path), "--action", "drop"), "--action")
    assert invoke("fit-factors", "-c", str(path)).exit_code == 0
    one_line_error(invoke("fix", "-c", str(path), "--flagged", "--set", "influence.damping_factor=0.5"),
                   "different data or influence settings", "--overwrite")


def test_flagged_needs_a_ranking(tmp_path: Path) -> None:
    path = noisy_config(tmp_path, "fresh")
    one_line_error(invoke("fix", "-c", str(path), "--flagged"), "mislabels.csv does not exist", "infl self-influence")


def test_flips_found_counts_the_checked_prefix() -> None:
    order = np.array([4, 0, 3, 1, 2, 5, 6, 7, 8, 9])
    flipped = np.zeros(10, dtype=bool)
    flipped[[0, 2, 9]] = True
    assert list(checked_rows(order, 0.2)) == [4, 0]
    assert list(flips_found(order, flipped, 0.2)) == [0]
    assert list(flips_found(order, flipped, 0.5)) == [0, 2]
    assert list(flips_found(order, flipped, 1.0)) == [0, 2, 9]
    assert list(checked_rows(order, 0.05)) == [4]  # at least one row: ceil


def test_evaluate_fix_writes_the_curve(tmp_path: Path) -> None:
    path = noisy_config(tmp_path, "curve")
    result = invoke("evaluate", "-c", str(path), "--fix", "--noise", "0.2", "-s", "kfac")
    assert result.exit_code == 0, result.output
    assert "fixing curve" in result.output
    run = tmp_path / "runs" / "curve-noise0.2-uniform"
    data = json.loads((run / "fixing.json").read_text())
    assert set(data["rankings"]) == {"kfac", "loss", "random"}
    for rows in data["rankings"].values():
        assert [r["fraction"] for r in rows] == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
        found = [r["flips_found"] for r in rows]
        assert found == sorted(found) and all(0 <= f <= 1 for f in found)
        assert all(0 <= r["retrained_accuracy"] <= 1 and 0 <= r["corrected_accuracy"] <= 1 for r in rows)
    assert data["cost"]["retrainings"] >= 2 and data["cost"]["ratio"] > 0
    assert data["reference"]["clean_accuracy"] > 0
    page = (run / "fixing.html").read_text()
    assert page.count("<svg") == 2 and "kfac retrained" in page
    import xml.etree.ElementTree as ET

    for part in page.split("<svg")[1:]:
        plot = ET.fromstring("<svg" + part.split("</svg>")[0] + "</svg>")  # well-formed inline SVG
        assert len(plot.findall("polyline")) == len(data["rankings"]) * (1 if "flips found" in part[:400] else 2)
