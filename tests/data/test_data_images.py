"""image_folder and csv_manifest sources on tiny image files written by the tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_cli.data import build_datasets
from influence_cli.errors import DataError

from data_helpers import solid, write_image


def make_folder(root, classes=("cat", "dog"), per_class=5, size=(4, 5)):
    """root/<class>/<k>.png; image k of class c has value 10 * (class index * per_class + k)."""
    for ci, name in enumerate(classes):
        for k in range(per_class):
            write_image(root / name / f"{k:03d}.png", solid(10 * (ci * per_class + k), size))


def test_image_folder_split_ids_and_pixels(cfg, tmp_path):
    make_folder(tmp_path / "imgs", per_class=5)
    data = build_datasets(cfg(source="image_folder", path="imgs", test_fraction=0.4, standardize=False))
    assert data.class_names == ["cat", "dog"] and data.kind == "image"
    assert data.input_shape == (3, 4, 5)
    assert len(data.train) == 6 and len(data.test) == 4
    assert sorted(data.test.labels.tolist()) == [0, 0, 1, 1]  # stratified
    all_ids = sorted(data.train.ids + data.test.ids)
    assert all_ids == [f"{c}/{k:03d}.png" for c in ("cat", "dog") for k in range(5)]
    assert data.train.ids == sorted(data.train.ids)
    for split in (data.train, data.test):
        for i, example_id in enumerate(split.ids):
            cls, name = example_id.split("/")
            assert data.class_names[int(split.labels[i])] == cls
            value = 10 * (["cat", "dog"].index(cls) * 5 + int(name[:3]))
            np.testing.assert_array_equal(split.display(i), solid(value))
            assert torch.allclose(split.inputs[i, 0], torch.full((4, 5), value / 255))


def test_image_folder_ids_stable_across_builds(cfg, tmp_path):
    make_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=4)
    one = build_datasets(cfg(source="image_folder", path="imgs"))
    two = build_datasets(cfg(source="image_folder", path="imgs"))
    assert one.train.ids == two.train.ids and one.test.ids == two.test.ids
    assert torch.equal(one.train.inputs, two.train.inputs)


def test_image_folder_grayscale_resize_extensions(cfg, tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "x" / "a.PNG", solid(40, (6, 6)), fmt="PNG")
    write_image(root / "x" / "b.jpg", solid(80, (10, 8)), fmt="JPEG")
    write_image(root / "y" / "sub" / "c.bmp", solid(120, (3, 9)), fmt="BMP")
    write_image(root / "y" / "d.gif", solid(160, (5, 5), rgb=False), fmt="GIF")
    (root / "y" / "notes.txt").write_text("not an image")
    data = build_datasets(
        cfg(source="image_folder", train_path="imgs", test_path="imgs", image_size=[7, 3], grayscale=True, standardize=False)
    )
    assert data.input_shape == (1, 7, 3)
    assert data.train.ids == ["x/a.PNG", "x/b.jpg", "y/d.gif", "y/sub/c.bmp"]
    shown = data.train.display(0)
    assert shown.shape == (7, 3) and shown.dtype == np.uint8
    gray_of_40 = round(0.299 * 40 + 0.587 * 20 + 0.114 * 215)  # Pillow's L conversion of (40, 20, 215)
    assert abs(int(shown[3, 1]) - gray_of_40) <= 1
    assert int(data.train.display(2)[0, 0]) == 160


def test_image_folder_sizes_must_match_without_image_size(cfg, tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, per_class=3, size=(4, 5))
    write_image(root / "dog" / "big.png", solid(7, (8, 8)))
    with pytest.raises(DataError) as err:
        build_datasets(cfg(source="image_folder", path="imgs"))
    assert "big.png" in str(err.value) and "data.image_size" in str(err.value)


def test_image_folder_corrupt_image(cfg, tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, per_class=3)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"broken\.png: cannot decode image"):
        build_datasets(cfg(source="image_folder", path="imgs"))


def test_image_folder_missing_and_empty(cfg, tmp_path):
    with pytest.raises(DataError, match=r"no such folder \(data\.path\)"):
        build_datasets(cfg(source="image_folder", path="nope"))
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "a.png", solid(1))  # no class subfolder
    with pytest.raises(DataError, match="no images in class subfolders"):
        build_datasets(cfg(source="image_folder", path="flat"))


def test_image_folder_unseen_test_class(cfg, tmp_path):
    make_folder(tmp_path / "train", classes=("cat", "dog"), per_class=2)
    make_folder(tmp_path / "test", classes=("cat", "dog", "emu"), per_class=1)
    with pytest.raises(DataError) as err:
        build_datasets(cfg(source="image_folder", train_path="train", test_path="test"))
    assert "emu" in str(err.value) and "data.test_path" in str(err.value)


def test_image_folder_train_test_subset_of_classes(cfg, tmp_path):
    make_folder(tmp_path / "train", classes=("a", "b", "c"), per_class=2)
    make_folder(tmp_path / "test", classes=("b",), per_class=2)
    data = build_datasets(cfg(source="image_folder", train_path="train", test_path="test"))
    assert data.class_names == ["a", "b", "c"]
    assert data.test.labels.tolist() == [1, 1] and data.test.ids == ["b/000.png", "b/001.png"]


def test_empty_split_is_an_error(cfg, tmp_path):
    make_folder(tmp_path / "imgs", classes=("a",), per_class=1)
    with pytest.raises(DataError, match="data.test_fraction .* leaves no training examples"):
        build_datasets(cfg(source="image_folder", path="imgs", test_fraction=0.5))


# ----------------------------------------------------------------------------- manifests


def make_manifest(folder, rows, name="manifest.csv", header="path,label"):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [header] + [f"{p},{label}" for p, label in rows]
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def test_manifest_split_and_ids(cfg, tmp_path):
    rows = []
    for k in range(8):
        label = "yes" if k % 2 else "no"
        write_image(tmp_path / "m" / "pics" / f"{k}.png", solid(20 * k))
        rows.append((f"pics/{k}.png", label))
    make_manifest(tmp_path / "m", rows)
    data = build_datasets(cfg(source="csv_manifest", path="m/manifest.csv", test_fraction=0.25, standardize=False))
    assert data.class_names == ["no", "yes"]
    assert len(data.train) == 6 and len(data.test) == 2
    assert sorted(data.test.labels.tolist()) == [0, 1]
    for split in (data.train, data.test):
        for i, example_id in enumerate(split.ids):
            k = int(example_id.split("/")[1][0])
            assert split.labels[i].item() == k % 2
            np.testing.assert_array_equal(split.display(i), solid(20 * k))


def test_manifest_train_test_and_unseen_label(cfg, tmp_path):
    for k in range(4):
        write_image(tmp_path / "img" / f"{k}.png", solid(k))
    make_manifest(tmp_path, [("img/0.png", "10"), ("img/1.png", "9")], name="train.csv")
    make_manifest(tmp_path, [("img/2.png", "9")], name="test.csv")
    data = build_datasets(cfg(source="csv_manifest", train_path="train.csv", test_path="test.csv"))
    assert data.class_names == ["9", "10"]  # integer labels sort numerically
    assert data.train.labels.tolist() == [1, 0] and data.test.labels.tolist() == [0]
    make_manifest(tmp_path, [("img/2.png", "9"), ("img/3.png", "11")], name="test.csv")
    with pytest.raises(DataError) as err:
        build_datasets(cfg(source="csv_manifest", train_path="train.csv", test_path="test.csv"))
    message = str(err.value)
    assert "test.csv" in message and "row 1" in message and "'11'" in message


def test_manifest_missing_column(cfg, tmp_path):
    make_manifest(tmp_path, [("a.png", "x")], header="file,label")
    with pytest.raises(DataError) as err:
        build_datasets(cfg(source="csv_manifest", path="manifest.csv"))
    assert "manifest.csv" in str(err.value) and "missing column 'path'" in str(err.value)


def test_manifest_missing_image_file(cfg, tmp_path):
    write_image(tmp_path / "a.png", solid(1))
    make_manifest(tmp_path, [("a.png", "x"), ("gone.png", "y")])
    with pytest.raises(DataError) as err:
        build_datasets(cfg(source="csv_manifest", path="manifest.csv"))
    message = str(err.value)
    assert "manifest.csv" in message and "row 1 (line 3)" in message and "gone.png" in message


def test_manifest_missing_csv(cfg):
    with pytest.raises(DataError, match=r"no such file \(data\.path\)"):
        build_datasets(cfg(source="csv_manifest", path="none.csv"))
