"""The decoded-data cache: reused while the source files are unchanged, rebuilt (never
used) when a file changes or the cache itself is damaged."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from influence_cli.config import config_from_dict
from influence_cli.data import build_datasets
from influence_cli.data.cache import load_datasets

from data_helpers import solid, write_image


class CountingBuild:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, config):
        self.calls += 1
        return build_datasets(config)


def assert_same(a, b) -> None:
    for name in ("train", "test"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.labels, y.labels) and x.ids == y.ids
        assert x.kind == y.kind and x.feature_names == y.feature_names
        for field in ("mean", "std"):
            assert (getattr(x, field) is None) == (getattr(y, field) is None)
            if getattr(x, field) is not None:
                assert torch.equal(getattr(x, field), getattr(y, field))
        assert (x.raw is None) == (y.raw is None)
        if x.raw is not None:
            np.testing.assert_array_equal(x.raw, y.raw)
    assert a.class_names == b.class_names and a.input_shape == b.input_shape and a.kind == b.kind
    assert a.fingerprint("train") == b.fingerprint("train")


def table(tmp_path: Path, **data):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=40), "b": rng.normal(size=40), "label": rng.integers(0, 3, 40)})
    frame.to_csv(tmp_path / "t.csv", index=False)
    return config_from_dict({"name": "c", "data": {"source": "table", "path": "t.csv", **data}}, base_dir=tmp_path)


def test_table_cache_is_reused_and_equals_a_fresh_build(tmp_path: Path) -> None:
    config = table(tmp_path, label_noise={"fraction": 0.2})
    build = CountingBuild()
    first = load_datasets(config, tmp_path / "cache", build)
    second = load_datasets(config, tmp_path / "cache", build)
    assert build.calls == 1
    assert_same(first, second)
    assert_same(second, build_datasets(config))
    assert torch.equal(first.noise.flipped, second.noise.flipped)
    assert torch.equal(first.noise.original_labels, second.noise.original_labels)


def test_edited_cell_rebuilds_and_touch_does_not(tmp_path: Path) -> None:
    config = table(tmp_path)
    build = CountingBuild()
    load_datasets(config, tmp_path / "cache", build)
    csv = tmp_path / "t.csv"
    st = csv.stat()
    os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same bytes, new time
    load_datasets(config, tmp_path / "cache", build)
    assert build.calls == 1
    frame = pd.read_csv(csv)
    frame.loc[3, "label"] = (frame.loc[3, "label"] + 1) % 3
    frame.to_csv(csv, index=False)
    edited = load_datasets(config, tmp_path / "cache", build)
    assert build.calls == 2
    assert_same(edited, build_datasets(config))
    assert load_datasets(config, tmp_path / "cache", build) is not None and build.calls == 2


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_is_rebuilt_never_used(tmp_path: Path, damage: str) -> None:
    config = table(tmp_path)
    build = CountingBuild()
    load_datasets(config, tmp_path / "cache", build)
    (path,) = (tmp_path / "cache").glob("data-*.safetensors")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[-10] ^= 0xFF  # inside the tensor data, past the header
    path.write_bytes(bytes(raw))
    rebuilt = load_datasets(config, tmp_path / "cache", build)
    assert build.calls == 2
    assert_same(rebuilt, build_datasets(config))


def test_image_folder_added_image_rebuilds(tmp_path: Path) -> None:
    for cls, value in (("a", 10), ("b", 200)):
        for i in range(4):
            write_image(tmp_path / "imgs" / cls / f"{i}.png", solid(value + i))
    config = config_from_dict(
        {"name": "c", "data": {"source": "image_folder", "path": "imgs", "test_fraction": 0.25}}, base_dir=tmp_path
    )
    build = CountingBuild()
    load_datasets(config, tmp_path / "cache", build)
    load_datasets(config, tmp_path / "cache", build)
    assert build.calls == 1
    write_image(tmp_path / "imgs" / "a" / "9.png", solid(40))
    grown = load_datasets(config, tmp_path / "cache", build)
    assert build.calls == 2 and len(grown.train) + len(grown.test) == 9


def test_manifest_image_change_rebuilds(tmp_path: Path) -> None:
    rows = []
    for i in range(8):
        write_image(tmp_path / "pics" / f"{i}.png", solid(20 * i))
        rows.append({"path": f"pics/{i}.png", "label": "x" if i % 2 else "y"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    config = config_from_dict(
        {"name": "c", "data": {"source": "csv_manifest", "path": "m.csv", "test_fraction": 0.25}}, base_dir=tmp_path
    )
    build = CountingBuild()
    load_datasets(config, tmp_path / "cache", build)
    write_image(tmp_path / "pics" / "3.png", solid(255))
    changed = load_datasets(config, tmp_path / "cache", build)
    assert build.calls == 2
    assert_same(changed, build_datasets(config))


def test_cache_off_and_uncached_sources_write_nothing(tmp_path: Path) -> None:
    load_datasets(table(tmp_path, cache=False), tmp_path / "cache", CountingBuild())
    synthetic = config_from_dict({"name": "c", "data": {"source": "synthetic"}}, base_dir=tmp_path)
    load_datasets(synthetic, tmp_path / "cache", CountingBuild())
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_build_warnings_are_replayed_from_the_cache(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": np.arange(12.0), "label": [0] * 11 + [1]})  # class 1: one row, cannot stratify
    frame.to_csv(tmp_path / "t.csv", index=False)
    config = config_from_dict(
        {"name": "c", "data": {"source": "table", "path": "t.csv", "test_fraction": 0.25}}, base_dir=tmp_path
    )
    build = CountingBuild()
    for expected_calls in (1, 1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_datasets(config, tmp_path / "cache", build)
        assert build.calls == expected_calls
        assert any("cannot stratify" in str(w.message) for w in caught)


def test_digits_cache_equals_the_sklearn_build(tmp_path: Path) -> None:
    config = config_from_dict({"name": "c"}, base_dir=tmp_path)
    build = CountingBuild()
    load_datasets(config, tmp_path / "cache", build)
    cached = load_datasets(config, tmp_path / "cache", build)
    assert build.calls == 1
    assert_same(cached, build_datasets(config))
