"""Disk full and unwritable outputs are environment errors: exit 2, one line naming the
path, nothing half-written left to be trusted later.

The full-disk case runs for real on a 64 KiB tmpfs mounted as output.dir (root only, and
only where mount is permitted); the write helpers are also tested with the low-level
write failing with ENOSPC, which needs no privileges.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from fault_helpers import assert_one_line_error, invoke, table_config, write_table
from influence_cli.errors import OutputError

NO_SPACE = "cannot write: no space left on the device"


@pytest.fixture
def config(tmp_path) -> Path:
    return table_config(tmp_path, write_table(tmp_path / "rows.csv"), tmp_path / "runs")


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_out_is_an_existing_folder(tmp_path, config):
    folder = tmp_path / "results"
    folder.mkdir()
    line = assert_one_line_error(invoke("self-influence", "-c", config, "--out", folder))
    assert line == f"error: {folder}: is a folder, not a file (--out); give a file path, e.g. {folder / 'ranking.csv'}"
    assert not (tmp_path / "runs").exists()  # refused before any work
    queries = tmp_path / "q.csv"
    queries.write_text("index\n0\n")
    for option in ("--out", "--matrix"):
        line = assert_one_line_error(invoke("score", queries, "-c", config, option, folder))
        assert f"{folder}: is a folder, not a file ({option})" in line
    assert list(folder.iterdir()) == []


def test_out_below_a_file_and_output_dir_that_is_a_file(tmp_path, config):
    line = assert_one_line_error(invoke("self-influence", "-c", config, "--out", config / "ranking.csv"))
    assert f"{config / 'ranking.csv'}: cannot write: {config} is a file, not a folder (--out)" in line
    line = assert_one_line_error(invoke("train", "-c", config, "--set", f"output.dir={config}"))
    assert line.startswith(f"error: {config / 'tiny'}: cannot write: a file is in the way where a folder is needed")


def test_write_helpers_map_enospc_and_keep_the_old_file(tmp_path, monkeypatch):
    from influence_cli.render import files as report
    from influence_cli.run import atomic_write_json

    target = tmp_path / "out" / "train.json"
    atomic_write_json(target, {"old": True})
    monkeypatch.setattr(Path, "write_text", enospc)
    with pytest.raises(OutputError) as info:
        atomic_write_json(target, {"new": True})
    assert str(info.value) == f"{target}: cannot write: no space left on the device; free some space or write elsewhere (--set output.dir=...)"
    monkeypatch.undo()
    csv = tmp_path / "out" / "ranking.csv"
    report.write_csv(pd.DataFrame({"a": [1]}), csv)
    monkeypatch.setattr(pd.DataFrame, "to_csv", enospc)
    with pytest.raises(OutputError, match=NO_SPACE) as info:
        report.write_csv(pd.DataFrame({"a": [2]}), csv)
    assert info.value.path == str(csv)
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True} and csv.read_text() == "a\n1\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["ranking.csv", "train.json"]  # no temporaries


def test_safetensors_writes_map_enospc(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from influence_cli.engine.storage import atomic_save
    from influence_cli.models import save_checkpoint

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    target = tmp_path / "factors" / "ekfac"
    with pytest.raises(OutputError, match=NO_SPACE) as info:
        atomic_save(target, {"x": torch.zeros(3)}, {"strategy": "ekfac"})
    assert info.value.path == str(target)
    assert list((tmp_path / "factors").iterdir()) == []
    with pytest.raises(OutputError, match=NO_SPACE) as info:
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "checkpoint.safetensors")
    assert info.value.path == str(tmp_path / "checkpoint.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factors"]


def test_cli_full_disk_while_writing_the_ranking(config, tmp_path, monkeypatch):
    first = invoke("self-influence", "-c", config)
    assert first.exit_code == 0, first.output
    ranking = tmp_path / "runs" / "tiny" / "self_influence.csv"
    before = ranking.read_bytes()
    monkeypatch.setattr(pd.DataFrame, "to_csv", enospc)
    line = assert_one_line_error(invoke("self-influence", "-c", config))
    assert line.startswith(f"error: {ranking}: {NO_SPACE}")
    assert ranking.read_bytes() == before


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs; skipped where mounting is not possible."""
    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount is not permitted here: {result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True, capture_output=True)


def test_full_and_read_only_disk_for_real(tmp_path, tiny_disk):
    # 128 hidden units: the last layer's q_a (129 x 129 float32, 66 KB) cannot fit.
    config = table_config(
        tmp_path, write_table(tmp_path / "rows.csv"), tiny_disk, model={"hidden_sizes": [128]}
    )
    run = tiny_disk / "tiny"
    line = assert_one_line_error(invoke("fit-factors", "-c", config))
    assert line.startswith(f"error: {run / 'factors' / 'ekfac'}: {NO_SPACE}")
    assert not (run / "factors" / "ekfac").exists()
    assert [p.name for p in run.rglob(".*") if p.name != ".lock"] == []  # nothing half-written
    remount(tiny_disk, "size=4m")
    fitted = invoke("fit-factors", "-c", config)
    assert fitted.exit_code == 0 and "fitted ekfac" in fitted.output, fitted.output
    meta = (run / "factors" / "ekfac" / "meta.json").read_bytes()
    remount(tiny_disk, "ro")
    line = assert_one_line_error(invoke("self-influence", "-c", config))
    assert "cannot write: read-only file system" in line and str(run) in line
    remount(tiny_disk, "rw")
    audited = invoke("self-influence", "-c", config)
    assert audited.exit_code == 0, audited.output
    assert (run / "factors" / "ekfac" / "meta.json").read_bytes() == meta  # the fitted factors were kept and reused
