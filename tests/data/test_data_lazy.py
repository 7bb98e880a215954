"""data.in_memory: false — inputs decoded per batch equal the in-memory path, the
fingerprint follows the files' content, nothing is held or cached as one tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from influence_cli.data import build_datasets
from influence_cli.data.cache import load_datasets
from influence_cli.data.lazy import LazyInputs
from influence_cli.errors import DataError
from influence_cli.loaders import BatchLoader


def _folder(root, per_class=6, size=(5, 4)):
    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cat"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("source", ["image_folder", "csv_manifest"])
def test_lazy_images_equal_in_memory(cfg, tmp_path, source):
    root = _folder(tmp_path / "imgs")
    if source == "csv_manifest":
        rows = [f"{p.relative_to(root).as_posix()},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
        (root / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
        path = "imgs/m.csv"
    else:
        path = "imgs"
    eager = build_datasets(cfg(source=source, path=path, in_memory=True, limit=10))
    lazy = build_datasets(cfg(source=source, path=path, in_memory=False, limit=10))
    assert isinstance(lazy.train.inputs, LazyInputs) and isinstance(eager.train.inputs, torch.Tensor)
    assert lazy.input_shape == eager.input_shape and lazy.train.ids == eager.train.ids
    torch.testing.assert_close(lazy.train.mean, eager.train.mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lazy.train.std, eager.train.std, rtol=1e-6, atol=1e-7)
    for part in ("train", "test"):
        got = torch.cat([x for x, _y, _i in BatchLoader(getattr(lazy, part), 4)])
        torch.testing.assert_close(got, getattr(eager, part).inputs, rtol=1e-6, atol=1e-6)
    assert lazy.train.display(3).tolist() == eager.train.display(3).tolist()
    sub = lazy.train.subset([4, 1])
    torch.testing.assert_close(sub.inputs[0], eager.train.inputs[4], rtol=1e-6, atol=1e-6)


def test_lazy_fingerprint_follows_file_bytes(cfg, tmp_path):
    root = _folder(tmp_path / "imgs")
    config = cfg(source="image_folder", path="imgs", in_memory=False)
    before = build_datasets(config).fingerprint("train")
    assert build_datasets(config).fingerprint("train") == before
    data = build_datasets(config)
    victim = root / data.train.ids[0]
    array = np.asarray(Image.open(victim)).copy()
    array[0, 0, 0] ^= 1
    Image.fromarray(array).save(victim)
    assert build_datasets(config).fingerprint("train") != before


def test_lazy_sets_are_not_cached_and_auto_switches(cfg, tmp_path, monkeypatch):
    _folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    data = load_datasets(cfg(source="image_folder", path="imgs", in_memory=False), cache, build_datasets)
    assert isinstance(data.train.inputs, LazyInputs) and not list(cache.glob("data-*"))
    assert isinstance(build_datasets(cfg(source="image_folder", path="imgs")).train.inputs, torch.Tensor)
    monkeypatch.setattr("influence_cli.data.lazy.IN_MEMORY_LIMIT_BYTES", 100)
    monkeypatch.setattr("influence_cli.data.factory.IN_MEMORY_LIMIT_BYTES", 100)
    assert isinstance(build_datasets(cfg(source="image_folder", path="imgs")).train.inputs, LazyInputs)


def test_lazy_image_of_another_size_is_a_data_error(cfg, tmp_path):
    root = _folder(tmp_path / "imgs")
    odd = sorted((root / "cat").glob("*.png"))[-1]
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(odd)
    data = build_datasets(cfg(source="image_folder", path="imgs", in_memory=False, standardize=False))
    index = data.train.ids.index(odd.relative_to(root).as_posix()) if odd.relative_to(root).as_posix() in data.train.ids else None
    part = data.train if index is not None else data.test
    index = index if index is not None else data.test.ids.index(odd.relative_to(root).as_posix())
    with pytest.raises(DataError, match="9x9 .*data.image_size"):
        part[index]
