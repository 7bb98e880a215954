"""Data edge cases: each is refused with one line naming the file, the row or column and
the fix, or (where the input is legitimate) just works."""

from __future__ import annotations

import pytest

from influence_cli.data import build_datasets
from influence_cli.errors import CheckpointError, DataError

from data_helpers import solid, write_image


def refused(config, *expected: str) -> str:
    with pytest.raises(DataError) as info:
        build_datasets(config)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, message
    return message


def rows(n: int, label=lambda i: "ab"[i % 2]) -> str:
    return "x,y,label\n" + "".join(f"{i},{i * 0.5},{label(i)}\n" for i in range(n))


# ----------------------------------------------------------------------------- tables


@pytest.mark.parametrize(
    "cell, what",
    [("-inf", "infinite value '-inf'"), ("1e999", "infinite value '1e999'"), ("  ", "missing or NaN value"),
     ("NaN", "missing or NaN value"), ("1,5", "fields"), ("12abc", "'12abc' is not a number")],
)
def test_table_bad_cells_name_the_row_and_column(cfg, tmp_path, cell, what):
    text = rows(6)
    lines = text.splitlines()
    lines[4] = f"3,{cell},b" if cell != "1,5" else "3,1,5,b"
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    if cell == "1,5":  # an extra field is a malformed CSV line, not a value
        refused(cfg(source="table", path="t.csv"), "t.csv", "cannot parse the CSV", "line 5")
    else:
        refused(cfg(source="table", path="t.csv"), "t.csv", "column 'y'", "row 3 (line 5)", what)


def test_table_empty_label_cell(cfg, tmp_path):
    (tmp_path / "t.csv").write_text(rows(4).replace("2,1.0,a", "2,1.0,"))
    refused(cfg(source="table", path="t.csv"), "t.csv", "column 'label' row 2 (line 4): empty label")


@pytest.mark.parametrize("field", ["path", "test_path"])
def test_header_only_table(cfg, tmp_path, field):
    (tmp_path / "full.csv").write_text(rows(6))
    (tmp_path / "header.csv").write_text("x,y,label\n")
    paths = {"path": "header.csv"} if field == "path" else {"train_path": "full.csv", "test_path": "header.csv"}
    refused(cfg(source="table", **paths), "header.csv", f"the table has no rows (data.{field})")


def test_empty_table_file(cfg, tmp_path):
    (tmp_path / "t.csv").write_text("")
    refused(cfg(source="table", path="t.csv"), "t.csv", "the CSV is empty (data.path)")


# ----------------------------------------------------------------------------- classes


def test_single_class_training_set_is_refused(cfg, tmp_path):
    (tmp_path / "t.csv").write_text(rows(10, label=lambda i: "yes"))
    refused(
        cfg(source="table", path="t.csv"), str(tmp_path / "t.csv"),
        "every training example has the label 'yes'", "at least 2 classes",
    )


def test_single_class_image_folder_is_refused(cfg, tmp_path):
    for k in range(4):
        write_image(tmp_path / "imgs" / "cat" / f"{k}.png", solid(10 * k))
    refused(cfg(source="image_folder", path="imgs", test_fraction=0.5), "imgs", "label 'cat'")


def test_limit_leaving_one_class_or_missing_test_classes(cfg):
    refused(cfg(source="digits", limit=1), "data.limit 1 keeps training examples of one class only", "raise data.limit")
    refused(cfg(source="digits", limit=5), "data.limit 5 keeps no training example of class", "test example", "raise data.limit")


def test_rare_class_stays_in_training_when_the_split_cannot_stratify(cfg, tmp_path):
    """A class with one example cannot be stratified; it is kept for training (where the
    audit looks at it), never put alone into the test split."""
    text = rows(20) + "99,99,rare\n"
    (tmp_path / "t.csv").write_text(text)
    for seed in range(6):
        with pytest.warns(UserWarning, match="cannot stratify"):
            data = build_datasets(cfg(source="table", path="t.csv", test_fraction=0.5, seed=seed))
        rare = data.class_names.index("rare")
        assert rare in data.train.labels.tolist() and rare not in data.test.labels.tolist()
        assert sorted(data.train.ids + data.test.ids, key=int) == [str(i) for i in range(21)]


def test_manifest_class_only_in_test_file(cfg, tmp_path):
    for k in range(3):
        write_image(tmp_path / f"{k}.png", solid(k))
    (tmp_path / "train.csv").write_text("path,label\n0.png,a\n1.png,b\n")
    (tmp_path / "test.csv").write_text("path,label\n2.png,c\n")
    refused(cfg(source="csv_manifest", train_path="train.csv", test_path="test.csv"), "test.csv", "row 0 (line 2)", "'c'")


# ----------------------------------------------------------------------------- images


def test_header_only_manifest(cfg, tmp_path):
    (tmp_path / "m.csv").write_text("path,label\n")
    refused(cfg(source="csv_manifest", path="m.csv"), "m.csv", "the manifest has no rows (data.path)")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_undecodable_image_in_manifest_names_the_row(cfg, tmp_path, damage):
    for k in range(4):
        write_image(tmp_path / "img" / f"{k}.png", solid(40 * k))
    bad = tmp_path / "img" / "3.png"
    data = bad.read_bytes()
    bad.write_bytes(b"not an image" if damage == "garbage" else data[: len(data) // 2])
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"img/{k}.png,{'ab'[k % 2]}\n" for k in range(4)))
    refused(cfg(source="csv_manifest", path="m.csv", test_fraction=0.5), "m.csv: row 3 (line 5)", "3.png", "cannot decode image")


def test_truncated_image_in_image_folder(cfg, tmp_path):
    for cls in ("a", "b"):
        for k in range(3):
            write_image(tmp_path / "imgs" / cls / f"{k}.png", solid(30 * k + (cls == "b") * 100))
    bad = tmp_path / "imgs" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    refused(cfg(source="image_folder", path="imgs"), str(bad), "cannot decode image", "remove or replace the file")


# ----------------------------------------------------------------------------- folders and files


def test_folder_where_a_file_is_expected_and_file_where_a_folder_is(cfg, tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile.csv").write_text(rows(4))
    refused(cfg(source="table", path="adir"), "adir", "is a folder, not a file (data.path)")
    refused(cfg(source="csv_manifest", path="adir"), "adir", "is a folder, not a file (data.path)")
    refused(cfg(source="image_folder", path="afile.csv"), "afile.csv", "is a file, not a folder (data.path)")
    write_image(tmp_path / "img" / "0.png", solid(1))
    (tmp_path / "img" / "sub").mkdir()
    (tmp_path / "m.csv").write_text("path,label\nimg/0.png,a\nimg/sub,b\n")
    refused(cfg(source="csv_manifest", path="m.csv"), "m.csv: row 1 (line 3): 'img/sub' is a folder, not an image file")


def test_checkpoint_that_is_a_folder(tmp_path):
    import torch

    from influence_cli.models import load_checkpoint

    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_checkpoint(torch.nn.Linear(2, 2), tmp_path)


def test_score_csv_that_is_a_folder(cfg, tmp_path):
    from influence_cli.data.queries import read_query_rows

    (tmp_path / "t.csv").write_text(rows(8))
    config = cfg(source="table", path="t.csv")
    with pytest.raises(DataError, match="is a folder, not a CSV file"):
        read_query_rows(tmp_path, config, build_datasets(config))
