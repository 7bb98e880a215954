"""End to end on a tiny randomly initialised BERT: train, self-influence finds the
injected label flips, score explains a test sentence; the hf_dataset readers."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hf_helpers import save_tiny_bert, write_text_csvs
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.config import config_from_dict
from influence_cli.data import build_datasets
from influence_cli.evaluation.metrics import auroc, average_precision

runner = CliRunner()


def write_config(folder: Path, **data) -> Path:
    config = {
        "name": "tiny-text",
        "data": {"source": "hf_dataset", "train_path": "train.csv", "test_path": "test.csv", "id_column": "id",
                 "max_length": 16, **data},
        "model": {"arch": "hf", "name_or_path": "tiny"},
        "train": {"epochs": 20, "batch_size": 16, "lr": 0.003, "device": "cpu"},
        "output": {"dir": str(folder / "runs")},
    }
    path = folder / "text.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    save_tiny_bert(folder / "tiny")
    flips = write_text_csvs(folder, train=120, test=20, flips=12)
    return folder, write_config(folder), flips


def test_self_influence_finds_flips_and_score_explains(text_run):
    folder, config, flips = text_run
    result = runner.invoke(app, ["train", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert "model: trained" in result.output
    result = runner.invoke(app, ["self-influence", "-c", str(config), "--top", "5"])
    assert result.exit_code == 0, result.output
    assert "influence: tracking 13 layers" in result.output  # last 2 blocks × 6 projections + head
    with open(folder / "runs" / "tiny-text" / "self_influence.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 120
    scores = [float(r["self_influence"]) for r in rows]
    positives = [r["id"] in flips for r in rows]
    ap, roc = average_precision(scores, positives), auroc(scores, positives)
    assert ap > 3 * len(flips) / len(rows)  # chance is 0.1
    assert roc > 0.8

    (folder / "query.csv").write_text("id,text,label\nq0,the movie was really brilliant,pos\nq1,this plot is dreadful,neg\n")
    out = folder / "scores.csv"
    result = runner.invoke(app, ["score", str(folder / "query.csv"), "-c", str(config), "--top", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out) as handle:
        table = list(csv.DictReader(handle))
    assert {r["test_id"] for r in table} == {"q0", "q1"}
    for query in ("q0", "q1"):
        mine = [r for r in table if r["test_id"] == query]
        assert [r["role"] for r in mine].count("proponent") == 3
        opponents = [r for r in mine if r["role"] == "opponent"]
        assert all(float(r["influence"]) < 0 for r in opponents)
        # The training sentences that argue against a clear test sentence are the flipped ones.
        assert sum(r["train_id"] in flips for r in opponents) >= 2


def test_tokenised_data_is_fingerprinted_and_read_from_every_format(tmp_path):
    save_tiny_bert(tmp_path / "tiny")
    write_text_csvs(tmp_path, train=12, test=4, flips=0)

    def datasets(**data):
        raw = yaml.safe_load(write_config(tmp_path, **data).read_text())
        return build_datasets(config_from_dict(raw, base_dir=tmp_path))

    a, b = datasets(), datasets(max_length=12)
    assert tuple(a.train.inputs.shape) == (12, 3, 16) and tuple(b.train.inputs.shape) == (12, 3, 12)
    assert a.fingerprint("train") != b.fingerprint("train")  # another tokenisation, another key
    assert a.train.display(0) == {"text": pd.read_csv(tmp_path / "train.csv")["text"][0]}
    assert a.train.mean is None  # token ids are never standardised
    from influence_cli.errors import DataError

    with pytest.raises(DataError, match=r"no text column 'sentence' \(data.text_column\); available columns: id, text, label"):
        datasets(text_column="sentence")

    frame = pd.read_csv(tmp_path / "train.csv")
    frame.to_parquet(tmp_path / "all.parquet")
    c = datasets(train_path=None, test_path=None, path="all.parquet", test_fraction=0.25)
    assert len(c.train) + len(c.test) == 12

    import datasets as hf_datasets

    hf_datasets.DatasetDict({
        "train": hf_datasets.Dataset.from_pandas(frame), "test": hf_datasets.Dataset.from_pandas(pd.read_csv(tmp_path / "test.csv")),
    }).save_to_disk(str(tmp_path / "saved"))
    d = datasets(train_path=None, test_path=None, path="saved")
    assert d.train.ids == a.train.ids and bool((d.train.inputs == a.train.inputs).all())


def test_training_hash_follows_the_model_folder_content_not_its_place(tmp_path):
    import shutil

    from influence_cli.run import training_hash

    save_tiny_bert(tmp_path / "tiny")
    write_text_csvs(tmp_path, train=12, test=4, flips=0)
    raw = yaml.safe_load(write_config(tmp_path).read_text())
    before = training_hash(config_from_dict(raw, base_dir=tmp_path), "fp")
    shutil.copytree(tmp_path / "tiny", tmp_path / "elsewhere")
    moved = training_hash(config_from_dict({**raw, "model": {"arch": "hf", "name_or_path": "elsewhere"}}, base_dir=tmp_path), "fp")
    assert moved == before
    save_tiny_bert(tmp_path / "tiny", seed=1)  # other pretrained weights in the same folder
    assert training_hash(config_from_dict(raw, base_dir=tmp_path), "fp") != before


def test_hf_config_errors_are_one_line(tmp_path):
    write_text_csvs(tmp_path, train=12, test=4, flips=0)
    config = write_config(tmp_path)
    result = runner.invoke(app, ["train", "-c", str(config)])  # no tiny/ folder
    assert result.exit_code == 2
    assert "model.name_or_path" in result.output and "not a folder" in result.output
    assert "Traceback" not in result.output
    raw = yaml.safe_load(config.read_text())
    raw["model"] = {"arch": "mlp"}
    config.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", "-c", str(config)])
    assert result.exit_code == 2 and "model.arch: hf" in result.output


def test_fine_tune_false_audits_the_folder_weights(tmp_path):
    save_tiny_bert(tmp_path / "tiny")
    write_text_csvs(tmp_path, train=16, test=4, flips=0)
    raw = yaml.safe_load(write_config(tmp_path).read_text())
    raw["model"]["fine_tune"] = False
    raw["influence"] = {"modules": ["model.classifier", "model.bert.encoder.layer.1.output.dense"]}
    (tmp_path / "text.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["self-influence", "-c", str(tmp_path / "text.yaml"), "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "model: loaded checkpoint" in result.output
    assert "tracking 2 layers, 2,146 of the model's" in result.output  # 64·32+32 + 32·2+2
    assert not (tmp_path / "runs" / "tiny-text" / "checkpoint.safetensors").exists()
