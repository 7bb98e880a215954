"""table source: numeric CSV features, string/int labels, id column, bad-data errors."""

from __future__ import annotations

import pytest
import torch

from influence_cli.data import build_datasets
from influence_cli.errors import DataError


def write_csv(path, text):
    path.write_text(text.strip() + "\n")
    return path


def people_csv(tmp_path, n=10):
    lines = ["name,height,weight,species"]
    for i in range(n):
        species = ["owl", "cat"][i % 2]
        lines.append(f"p{i},{1.5 + i / 10:.2f},{60 + i},{species}")
    return write_csv(tmp_path / "people.csv", "\n".join(lines))


def test_table_string_labels_id_column_display(cfg, tmp_path):
    people_csv(tmp_path)
    data = build_datasets(
        cfg(source="table", path="people.csv", label_column="species", id_column="name", test_fraction=0.2)
    )
    assert data.kind == "table" and data.input_shape == (2,)
    assert data.class_names == ["cat", "owl"]
    assert len(data.train) == 8 and len(data.test) == 2
    assert sorted(data.test.labels.tolist()) == [0, 1]
    assert sorted(data.train.ids + data.test.ids) == sorted(f"p{i}" for i in range(10))
    for split in (data.train, data.test):
        for j, example_id in enumerate(split.ids):
            i = int(example_id[1:])
            assert split.display(j) == {"height": float(f"{1.5 + i / 10:.2f}"), "weight": 60.0 + i}
            assert data.class_names[split.labels[j]] == ["owl", "cat"][i % 2]
    # standardised per feature with the train statistics
    assert torch.allclose(data.train.inputs.mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(data.train.inputs.std(0, unbiased=False), torch.ones(2), atol=1e-4)


def test_table_row_number_ids_and_numeric_labels(cfg, tmp_path):
    write_csv(tmp_path / "t.csv", "a,b,label\n" + "\n".join(f"{i},{i * i},{[10, 2, 33][i % 3]}" for i in range(9)))
    data = build_datasets(cfg(source="table", path="t.csv", test_fraction=0.34, standardize=False))
    assert data.class_names == ["2", "10", "33"]
    for split in (data.train, data.test):
        for j, example_id in enumerate(split.ids):
            i = int(example_id)
            assert split.inputs[j].tolist() == [float(i), float(i * i)]
            assert data.class_names[split.labels[j]] == str([10, 2, 33][i % 3])


def test_table_feature_columns_and_train_test(cfg, tmp_path):
    write_csv(tmp_path / "train.csv", "x,y,z,label\n1,2,3,a\n4,5,6,b\n7,8,9,a")
    write_csv(tmp_path / "test.csv", "z,x,label\n30,10,b")
    data = build_datasets(
        cfg(source="table", train_path="train.csv", test_path="test.csv", feature_columns=["x", "z"], standardize=False)
    )
    assert data.train.ids == ["0", "1", "2"] and data.test.ids == ["0"]
    assert data.test.inputs.tolist() == [[10.0, 30.0]] and data.test.labels.tolist() == [1]


def test_table_unseen_test_label(cfg, tmp_path):
    write_csv(tmp_path / "train.csv", "x,label\n1,a\n2,b")
    write_csv(tmp_path / "test.csv", "x,label\n1,a\n2,c")
    with pytest.raises(DataError) as err:
        build_datasets(cfg(source="table", train_path="train.csv", test_path="test.csv"))
    assert "test.csv" in str(err.value) and "row 1" in str(err.value) and "'c'" in str(err.value)


def test_table_missing_label_column_lists_columns(cfg, tmp_path):
    write_csv(tmp_path / "t.csv", "x,y,target\n1,2,a\n3,4,b")
    with pytest.raises(DataError) as err:
        build_datasets(cfg(source="table", path="t.csv"))
    message = str(err.value)
    assert "'label'" in message and "x, y, target" in message and "data.label_column" in message


def test_table_non_numeric_feature(cfg, tmp_path):
    write_csv(tmp_path / "t.csv", "x,colour,label\n1,2,a\n3,red,b\n4,blue,a")
    with pytest.raises(DataError) as err:
        build_datasets(cfg(source="table", path="t.csv"))
    message = str(err.value)
    assert "'colour'" in message and "row 1" in message and "'red' is not a number" in message


@pytest.mark.parametrize("cell, what", [("", "missing or NaN"), ("nan", "missing or NaN"), ("inf", "infinite")])
def test_table_nan_and_inf(cfg, tmp_path, cell, what):
    write_csv(tmp_path / "t.csv", f"x,y,label\n1,2,a\n3,4,b\n5,{cell},a")
    with pytest.raises(DataError) as err:
        build_datasets(cfg(source="table", path="t.csv"))
    assert "'y'" in str(err.value) and "row 2" in str(err.value) and what in str(err.value)


def test_table_duplicate_ids_and_missing_file(cfg, tmp_path):
    write_csv(tmp_path / "t.csv", "id,x,label\nq,1,a\nq,2,b")
    with pytest.raises(DataError, match="id 'q' repeats"):
        build_datasets(cfg(source="table", path="t.csv", id_column="id"))
    with pytest.raises(DataError, match="no such file"):
        build_datasets(cfg(source="table", path="missing.csv"))


def test_table_zero_variance_feature_is_guarded(cfg, tmp_path):
    write_csv(tmp_path / "t.csv", "c,x,label\n" + "\n".join(f"5,{i},{i % 2}" for i in range(10)))
    data = build_datasets(cfg(source="table", path="t.csv"))
    assert torch.isfinite(data.train.inputs).all() and torch.isfinite(data.test.inputs).all()
    assert data.train.inputs[:, 0].abs().max() == 0
    assert data.test.display(0)["c"] == 5.0


def test_parquet_and_categorical_columns(tmp_path):
    """A parquet table reads like the same CSV; categorical columns become one-hot
    features in sorted category order taken from the training rows, and query rows giving
    the raw category encode the same way (an unseen category is all zeros)."""
    import pandas as pd

    pytest.importorskip("pyarrow")
    from influence_cli.config import config_from_dict
    from influence_cli.data import build_datasets
    from influence_cli.data.queries import read_query_rows

    frame = pd.DataFrame({
        "size": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "color": ["red", "blue", "red", "green", "blue", "red"],
        "label": ["a", "b", "a", "b", "a", "b"],
    })
    frame.iloc[:4].to_parquet(tmp_path / "train.parquet")
    test = frame.iloc[4:].copy()
    test.loc[5, "color"] = "violet"
    test.to_csv(tmp_path / "test.csv", index=False)
    config = config_from_dict({"name": "t", "data": {
        "source": "table", "train_path": str(tmp_path / "train.parquet"), "test_path": str(tmp_path / "test.csv"),
        "categorical_columns": ["color"], "standardize": False}})
    data = build_datasets(config)
    assert data.train.feature_names == ["size", "color=blue", "color=green", "color=red"]
    assert data.train.inputs.tolist() == [[1, 0, 0, 1], [2, 1, 0, 0], [3, 0, 0, 1], [4, 0, 1, 0]]
    assert data.test.inputs.tolist() == [[5, 1, 0, 0], [6, 0, 0, 0]]
    (tmp_path / "q.csv").write_text("size,color\n7,green\n8,violet\n")
    queries = read_query_rows(tmp_path / "q.csv", config, data)
    assert queries.inputs.tolist() == [[7, 0, 1, 0], [8, 0, 0, 0]]
    frame.iloc[:4].to_csv(tmp_path / "train.csv", index=False)
    same = build_datasets(config.model_copy(update={"data": config.data.model_copy(update={"train_path": str(tmp_path / "train.csv")})}))
    assert torch.equal(same.train.inputs, data.train.inputs)


def test_regression_table_targets(tmp_path):
    from influence_cli.config import config_from_dict
    from influence_cli.data import build_datasets
    from influence_cli.errors import DataError

    (tmp_path / "r.csv").write_text("x,y\n" + "".join(f"{i},{i * 0.5}\n" for i in range(10)))
    config = config_from_dict({"name": "r", "task": "regression", "data": {
        "source": "table", "path": str(tmp_path / "r.csv"), "label_column": "y", "standardize": False}})
    data = build_datasets(config)
    assert data.class_names == ["y"] and data.train.labels.dtype == torch.float32
    torch.testing.assert_close(data.train.labels, data.train.inputs[:, 0] * 0.5)
    (tmp_path / "r.csv").write_text("x,y\n1,2\n2,oops\n3,1\n4,1\n")
    with pytest.raises(DataError, match="'oops' is not a number; task: regression"):
        build_datasets(config)
