"""Corrupted or truncated files under runs/<name>/: factors (tensors and meta.json), the
trained checkpoint, shard files and cached LDS retrainings are never used silently.

Each is damaged two ways, truncated and with one flipped byte in the middle (for JSON also
a changed digit that still parses). `fit-factors` refuses damaged factors with one line
(without --overwrite); the audit commands refit, retrain or recompute, saying why, and end
with the outputs of an undamaged run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fault_helpers import DAMAGE, assert_one_line_error, flip_digit, invoke, table_config, write_table, truncate

JSON_DAMAGE = {"truncated": truncate, "changed digit": flip_digit}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """An undamaged run: checkpoint, ekfac factors, self-influence CSVs."""
    root = tmp_path_factory.mktemp("pristine")
    table = write_table(root / "rows.csv")
    config = table_config(root, table, root / "runs")
    result = invoke("self-influence", "-c", config)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def run(tmp_path, pristine) -> tuple[Path, Path]:
    """(config, run directory): a copy of the pristine run that a test may damage."""
    shutil.copytree(pristine / "runs", tmp_path / "runs")
    config = table_config(tmp_path, pristine / "rows.csv", tmp_path / "runs")
    return config, tmp_path / "runs" / "tiny"


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_like_pristine(run_dir: Path, pristine: Path) -> None:
    ref = pristine / "runs" / "tiny"
    ours, theirs = tensors(run_dir / "factors/ekfac/factors.safetensors"), tensors(ref / "factors/ekfac/factors.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (run_dir / "checkpoint.safetensors").read_bytes() == (ref / "checkpoint.safetensors").read_bytes()
    assert (run_dir / "self_influence.csv").read_bytes() == (ref / "self_influence.csv").read_bytes()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_factor_tensors_are_refused_or_refitted(run, pristine, damage):
    config, run_dir = run
    target = run_dir / "factors" / "ekfac" / "factors.safetensors"
    DAMAGE[damage](target)
    refused = invoke("fit-factors", "-c", config)
    line = assert_one_line_error(refused)
    assert str(run_dir / "factors" / "ekfac") in line
    assert "factors.safetensors is truncated or damaged (its sha256 does not match meta.json)" in line
    assert "--overwrite" in line
    audited = invoke("self-influence", "-c", config)
    assert audited.exit_code == 0, audited.output
    assert f"factors in {run_dir / 'factors' / 'ekfac'}: factors.safetensors is truncated or damaged" in audited.output
    assert "refitting" in audited.output
    assert_like_pristine(run_dir, pristine)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "changed digit", "no content hash"])
def test_damaged_factors_meta_is_refused_or_refitted(run, pristine, damage):
    config, run_dir = run
    meta = run_dir / "factors" / "ekfac" / "meta.json"
    if damage == "no content hash":  # e.g. written by an older infl
        data = json.loads(meta.read_text())
        del data["meta_sha256"]
        meta.write_text(json.dumps(data))
    else:
        {**DAMAGE, **JSON_DAMAGE}[damage](meta)
    refused = invoke("fit-factors", "-c", config)
    line = assert_one_line_error(refused)
    assert str(run_dir / "factors" / "ekfac") in line and "--overwrite" in line
    reasons = {
        "truncated": ["meta.json is truncated or not valid JSON"],
        "changed digit": ["meta.json is damaged or edited (its content hash does not match)"],
        "no content hash": ["meta.json is without a content hash (written by an older infl)"],
        "flipped byte": ["meta.json is truncated or not valid JSON", "meta.json is damaged or edited"],
    }
    assert any(reason in line for reason in reasons[damage]), line
    audited = invoke("self-influence", "-c", config)
    assert audited.exit_code == 0, audited.output
    assert "refitting" in audited.output
    assert_like_pristine(run_dir, pristine)
    assert json.loads(meta.read_text())["meta_sha256"]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_retrained(run, pristine, damage):
    config, run_dir = run
    DAMAGE[damage](run_dir / "checkpoint.safetensors")
    result = invoke("self-influence", "-c", config)
    assert result.exit_code == 0, result.output
    assert (
        f"{run_dir / 'checkpoint.safetensors'} is truncated, damaged or replaced (its hash does not match train.json); "
        "training again" in result.output
    )
    assert "model: trained" in result.output
    assert_like_pristine(run_dir, pristine)  # deterministic training: the same checkpoint again


def test_new_checkpoint_with_old_train_json_is_not_trusted(run, pristine, tmp_path):
    """An interruption between writing checkpoint.safetensors and train.json leaves a new
    checkpoint beside the old train.json: its recorded checkpoint hash catches it."""
    config, run_dir = run
    other = table_config(tmp_path / "other", pristine / "rows.csv", tmp_path / "other-runs", train={"epochs": 3})
    assert invoke("train", "-c", other).exit_code == 0
    shutil.copy(tmp_path / "other-runs" / "tiny" / "checkpoint.safetensors", run_dir / "checkpoint.safetensors")
    result = invoke("train", "-c", config)
    assert result.exit_code == 0, result.output
    assert "does not match train.json); training again" in result.output and "model: trained" in result.output
    assert (run_dir / "checkpoint.safetensors").read_bytes() == (
        pristine / "runs" / "tiny" / "checkpoint.safetensors"
    ).read_bytes()
    # The factors were fitted for the pristine checkpoint, which is back: still valid.
    assert "reusing" in invoke("fit-factors", "-c", config).output


def test_damaged_shard_files_are_refused(run, pristine):
    config, run_dir = run
    for index in (0, 1):
        result = invoke("self-influence", "-c", config, "--shard", f"{index}/2")
        assert result.exit_code == 0, result.output
    shards = run_dir / "shards" / "self-influence-ekfac"
    originals = {p.name: p.read_bytes() for p in shards.iterdir()}

    def restore() -> None:
        for name, data in originals.items():
            (shards / name).write_bytes(data)

    for name, damage in (("0-of-2.safetensors", truncate), ("1-of-2.safetensors", DAMAGE["flipped byte"])):
        damage(shards / name)
        line = assert_one_line_error(invoke("merge", "-c", config))
        assert f"corrupt shard {shards / name}" in line and "--shard" in line
        restore()
    for name, damage in (("0-of-2.json", truncate), ("1-of-2.json", flip_digit)):
        damage(shards / name)
        line = assert_one_line_error(invoke("merge", "-c", config))
        assert f"{shards / name}: unreadable or damaged shard metadata" in line
        restore()
    merged = invoke("merge", "-c", config)
    assert merged.exit_code == 0, merged.output


def test_damaged_lds_cache_is_retrained(run):
    config, run_dir = run
    args = ("evaluate", "--lds", "--subsets", "3", "--test-rows", "8", "-s", "identity", "-c", config)
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    cache = sorted((run_dir / "lds").glob("*.json"))
    assert len(cache) == 3
    values = {p.name: json.loads(p.read_text())["values"] for p in cache}
    lds = json.loads((run_dir / "lds.json").read_text())["strategies"]["identity"]
    truncate(cache[0])
    flip_digit(cache[1])
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    for path in cache[:2]:
        assert f"{path}: cached retraining is truncated or damaged; retraining it" in again.output
    result = json.loads((run_dir / "lds.json").read_text())
    assert result["retraining"]["trained_now"] == 2 and result["retraining"]["reused"] == 1
    assert {p.name: json.loads(p.read_text())["values"] for p in cache} == values
    assert {k: result["strategies"]["identity"][k] for k in ("mean", "stderr", "rows")} == {
        k: lds[k] for k in ("mean", "stderr", "rows")
    }
