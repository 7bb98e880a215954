"""`infl score` input CSVs: each format and each bad-row error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from influence_cli.config import config_from_dict
from influence_cli.data import build_datasets
from influence_cli.data.queries import read_query_rows
from influence_cli.errors import DataError


def digits():
    config = config_from_dict({"name": "d"})
    return config, build_datasets(config)


def test_index_format(tmp_path: Path) -> None:
    config, data = digits()
    path = tmp_path / "q.csv"
    path.write_text("index,label\n0,\n5,3\n")
    rows = read_query_rows(path, config, data)
    assert rows.source_format == "index"
    assert torch.equal(rows.inputs[1], data.test.inputs[5])
    assert rows.labels.tolist() == [-1, 3]
    path.write_text("index\n2\n")
    rows = read_query_rows(path, config, data)
    assert rows.labels.tolist() == [int(data.test.labels[2])]
    assert rows.ids == [f"test/{data.test.ids[2]}"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("index\n99999\n", r"row 1 \(line 2\): index 99999 is out of range"),
        ("index\nabc\n", "is not an integer"),
        ("index,label\n1,7\n2,cat\n", r"row 2 \(line 3\): unknown label 'cat'"),
        ("index,label\n1\n", "has 1 fields but the header has 2"),
        ("x0,x1\n1,2\n", "missing columns"),
    ],
)
def test_index_errors(tmp_path: Path, text: str, match: str) -> None:
    config, data = digits()
    path = tmp_path / "q.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        read_query_rows(path, config, data)


def test_table_features(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": np.arange(20.0), "b": np.arange(20.0) % 3, "label": ["x", "y"] * 10})
    frame.to_csv(tmp_path / "t.csv", index=False)
    config = config_from_dict({"name": "t", "data": {"source": "table", "path": "t.csv"}}, base_dir=tmp_path)
    data = build_datasets(config)
    (tmp_path / "q.csv").write_text("id,b,a,label\nfirst,1,4,y\nsecond,0,2,\n")
    rows = read_query_rows(tmp_path / "q.csv", config, data)
    expected = (torch.tensor([[4.0, 1.0], [2.0, 0.0]]) - data.train.mean) / data.train.std
    assert torch.allclose(rows.inputs, expected)
    assert rows.labels.tolist() == [1, -1] and rows.ids == ["first", "second"]
    (tmp_path / "bad.csv").write_text("a,b\n1,oops\n")
    with pytest.raises(DataError, match=r"row 1 \(line 2\): column 'b' value 'oops' is not a number"):
        read_query_rows(tmp_path / "bad.csv", config, data)


def test_image_paths(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    config = config_from_dict(
        {"name": "i", "data": {"source": "image_folder", "path": "imgs", "test_fraction": 0.34}}, base_dir=tmp_path
    )
    data = build_datasets(config)
    (tmp_path / "q").mkdir()
    Image.fromarray(np.full((6, 6, 3), 128, dtype=np.uint8)).save(tmp_path / "q" / "new.png")
    (tmp_path / "q" / "rows.csv").write_text("path,label\nnew.png,b\n")
    rows = read_query_rows(tmp_path / "q" / "rows.csv", config, data)
    expected = (torch.full((3, 6, 6), 128 / 255.0) - data.train.mean) / data.train.std
    assert torch.allclose(rows.inputs[0], expected, atol=1e-6)
    assert rows.labels.tolist() == [1] and rows.ids == ["new.png"]
    (tmp_path / "q" / "missing.csv").write_text("path\nnothere.png\n")
    with pytest.raises(DataError, match=r"row 1 \(line 2\): image file .*nothere.png not found"):
        read_query_rows(tmp_path / "q" / "missing.csv", config, data)
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(tmp_path / "q" / "big.png")
    (tmp_path / "q" / "big.csv").write_text("path\nbig.png\n")
    with pytest.raises(DataError, match="the model expects"):
        read_query_rows(tmp_path / "q" / "big.csv", config, data)
