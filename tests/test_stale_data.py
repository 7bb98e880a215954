"""Cached outputs follow the data, not the config: an edited label, an added row or a
changed image retrains and refits (saying why); a restored old run directory is never
trusted; the config saved in a run folder replays without retraining."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.data.fingerprint import fingerprint_split

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def flat(output: str) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(output.split())


def write_tables(folder: Path, n_train: int = 60, n_test: int = 20) -> tuple[Path, Path]:
    gen = torch.Generator().manual_seed(0)
    paths = []
    for name, n in (("train.csv", n_train), ("test.csv", n_test)):
        x = torch.randn(n, 3, generator=gen)
        label = np.where(x[:, 0].numpy() > 0, "yes", "no")
        frame = pd.DataFrame({"key": [f"{name[:-4]}-{i}" for i in range(n)], "f1": x[:, 0], "f2": x[:, 1],
                              "f3": x[:, 2], "label": label})
        frame.to_csv(folder / name, index=False)
        paths.append(folder / name)
    return paths[0], paths[1]


def table_config(folder: Path, **data: object) -> Path:
    write_tables(folder)
    cfg = {
        "name": "stale",
        "data": {"source": "table", "train_path": "train.csv", "test_path": "test.csv", "id_column": "key", **data},
        "model": {"arch": "mlp", "hidden_sizes": [8]},
        "train": {"epochs": 5, "batch_size": 16, "lr": 0.01},
        "influence": {"strategy": "ekfac"},
        "output": {"dir": str(folder / "runs")},
    }
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def flip_first_label(train_csv: Path) -> None:
    frame = pd.read_csv(train_csv)
    frame.loc[0, "label"] = "no" if frame.loc[0, "label"] == "yes" else "yes"
    frame.to_csv(train_csv, index=False)


def test_fingerprint_changes_with_content_only() -> None:
    x, y, ids = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]), ["a", "b", "c", "d", "e"]
    base = fingerprint_split(x, y, ids, ["no", "yes"])
    assert fingerprint_split(x.clone(), y.clone(), list(ids), ["no", "yes"]) == base
    y2 = y.clone()
    y2[0] = 1
    x2 = x.clone()
    x2[4, 2] += 1e-6
    assert fingerprint_split(x, y2, ids, ["no", "yes"]) != base
    assert fingerprint_split(x2, y, ids, ["no", "yes"]) != base
    assert fingerprint_split(x, y, ["a", "b", "c", "d", "f"], ["no", "yes"]) != base
    assert fingerprint_split(x, y, ids, ["no", "ja"]) != base
    assert fingerprint_split(x[:4], y[:4], ids[:4], ["no", "yes"]) != base


def test_edited_label_retrains_and_refits(tmp_path: Path) -> None:
    config = table_config(tmp_path)
    first = invoke("self-influence", "-c", config)
    assert first.exit_code == 0, first.output
    again = invoke("train", "-c", config)
    assert again.exit_code == 0 and "loaded checkpoint" in again.output
    meta = (tmp_path / "runs" / "stale" / "train.json").read_text()

    flip_first_label(tmp_path / "train.csv")
    result = invoke("train", "-c", config)
    assert result.exit_code == 0, result.output
    assert "the training data changed (labels or inputs edited); retraining" in flat(result.output)
    assert "model: trained" in result.output
    assert (tmp_path / "runs" / "stale" / "train.json").read_text() != meta

    # The factors were fitted for the old data: the audit refits them and says so.
    audit = invoke("self-influence", "-c", config)
    assert audit.exit_code == 0, audit.output
    assert "refitting" in flat(audit.output)
    table = pd.read_csv(tmp_path / "runs" / "stale" / "self_influence.csv")
    row = table[table["id"] == "train-0"].iloc[0]
    edited = pd.read_csv(tmp_path / "train.csv").loc[0, "label"]
    assert row["label_name"] == edited


def test_added_row_retrains_and_says_how_many(tmp_path: Path) -> None:
    config = table_config(tmp_path)
    assert invoke("train", "-c", config).exit_code == 0
    frame = pd.read_csv(tmp_path / "train.csv")
    frame = pd.concat([frame, frame.iloc[[3]].assign(key="train-new")], ignore_index=True)
    frame.to_csv(tmp_path / "train.csv", index=False)
    result = invoke("train", "-c", config)
    assert result.exit_code == 0
    assert "the training data changed (60 → 61 training examples); retraining" in flat(result.output)


def test_fit_factors_refuses_stale_factors_for_a_user_checkpoint(tmp_path: Path) -> None:
    config = table_config(tmp_path)
    assert invoke("train", "-c", config).exit_code == 0
    user_ckpt = tmp_path / "mine.safetensors"
    shutil.copy(tmp_path / "runs" / "stale" / "checkpoint.safetensors", user_ckpt)
    with_ckpt = ["-c", config, "--set", f"model.checkpoint={user_ckpt}"]
    assert invoke("fit-factors", *with_ckpt).exit_code == 0

    flip_first_label(tmp_path / "train.csv")
    refused = invoke("fit-factors", *with_ckpt)
    assert refused.exit_code == 2
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith("error")]) == 1
    assert "the training data changed (labels or inputs edited) since the factors were fitted" in refused.output
    assert "--overwrite" in refused.output
    audit = invoke("self-influence", *with_ckpt)
    assert audit.exit_code == 0, audit.output
    assert "since the factors were fitted; refitting" in flat(audit.output)
    assert invoke("fit-factors", *with_ckpt).exit_code == 0  # refitted above: valid again


def _image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(6 if split == "train" else 2):
                pixels = rng.integers(0, 255, size=(6, 6, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_changed_image_retrains_but_a_touched_one_does_not(tmp_path: Path) -> None:
    _image_folder(tmp_path)
    cfg = {
        "name": "imgs",
        "data": {"source": "image_folder", "train_path": "train", "test_path": "test"},
        "model": {"arch": "mlp", "hidden_sizes": [4]},
        "train": {"epochs": 2, "batch_size": 8},
        "output": {"dir": str(tmp_path / "runs")},
    }
    config = tmp_path / "imgs.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert invoke("train", "-c", config).exit_code == 0
    image = tmp_path / "train" / "cat" / "0.png"
    stat = image.stat()
    os.utime(image, (stat.st_atime + 100, stat.st_mtime + 100))  # same pixels, new mtime
    reused = invoke("train", "-c", config)
    assert reused.exit_code == 0 and "loaded checkpoint" in reused.output
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    result = invoke("train", "-c", config)
    assert result.exit_code == 0
    assert "the training data changed (labels or inputs edited); retraining" in flat(result.output)


def test_restored_old_run_directory_is_not_trusted(tmp_path: Path) -> None:
    """The docs/ci.md cache recipe: runs/ restored from yesterday's data, today's labels."""
    config = table_config(tmp_path)
    assert invoke("check", "-c", config).exit_code in (0, 1)
    cache = tmp_path / "ci-cache"
    shutil.copytree(tmp_path / "runs", cache)

    flip_first_label(tmp_path / "train.csv")
    shutil.rmtree(tmp_path / "runs")
    shutil.copytree(cache, tmp_path / "runs")  # restore the stale cache
    result = invoke("check", "-c", config)
    assert result.exit_code in (0, 1), result.output
    assert "retraining" in flat(result.output)
    restored = pd.read_csv(tmp_path / "runs" / "stale" / "self_influence.csv")

    fresh = invoke("check", "-c", config, "--set", f"output.dir={tmp_path / 'fresh'}")
    assert fresh.exit_code in (0, 1)
    expected = pd.read_csv(tmp_path / "fresh" / "stale" / "self_influence.csv")
    pd.testing.assert_frame_equal(restored, expected)


def test_saved_config_replays_from_another_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "project"
    data_dir.mkdir()
    config = table_config(data_dir)
    assert invoke("train", "-c", config).exit_code == 0
    saved = data_dir / "runs" / "stale" / "config.yaml"
    replay = yaml.safe_load(saved.read_text())
    assert Path(replay["data"]["train_path"]).is_absolute() and Path(replay["data"]["train_path"]).is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke("train", "-c", saved)
    assert result.exit_code == 0, result.output
    assert "loaded checkpoint" in result.output  # same data, same settings: no retraining


def test_check_baseline_warns_when_a_table_has_no_id_column(tmp_path: Path) -> None:
    config = table_config(tmp_path, id_column=None, feature_columns=["f1", "f2", "f3"])
    baseline = tmp_path / "baseline.csv"
    assert invoke("check", "-c", config, "--write-baseline", baseline).exit_code in (0, 1)
    warned = invoke("check", "-c", config, "--baseline", baseline)
    assert warned.exit_code in (0, 1)
    assert "data.id_column is not set" in flat(warned.output)
    keyed = table_config(tmp_path / "keyed" if (tmp_path / "keyed").mkdir() is None else tmp_path)
    keyed_baseline = tmp_path / "keyed-baseline.csv"
    assert invoke("check", "-c", keyed, "--write-baseline", keyed_baseline).exit_code in (0, 1)
    quiet = invoke("check", "-c", keyed, "--baseline", keyed_baseline)
    assert quiet.exit_code in (0, 1)
    assert "data.id_column is not set" not in flat(quiet.output)
