"""digits and the torchvision sources (on fake files in the real on-disk layout)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from influence_cli.data import build_datasets
from influence_cli.errors import ConfigError, DataError

from data_helpers import CIFAR_NAMES, trust_fake_cifar, write_fake_cifar, write_fake_mnist


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_split_sizes_stratified_and_ids_are_rows(cfg, digits):
    data = build_datasets(cfg(source="digits", test_fraction=0.25))
    n = len(digits.target)
    assert len(data.train) + len(data.test) == n
    assert len(data.test) == int(np.ceil(0.25 * n))
    assert data.class_names == [str(i) for i in range(10)]
    assert data.input_shape == (1, 8, 8) and data.kind == "image" and data.noise is None
    ids = [int(i) for i in data.train.ids] + [int(i) for i in data.test.ids]
    assert sorted(ids) == list(range(n))  # a partition of the rows
    assert [int(i) for i in data.train.ids] == sorted(int(i) for i in data.train.ids)
    # ids are load_digits row numbers: labels and natural pixels match the source row
    for split in (data.train, data.test):
        rows = np.array([int(i) for i in split.ids])
        assert torch.equal(split.labels, torch.from_numpy(digits.target[rows]).long())
    row = int(data.test.ids[3])
    np.testing.assert_array_equal(data.test.display(3), np.rint(digits.images[row] * 255 / 16).astype(np.uint8))
    assert data.test.display(3).dtype == np.uint8
    # stratified: each class's share of the test split matches its share overall within one example
    overall = Counter(digits.target.tolist())
    test_counts = Counter(data.test.labels.tolist())
    for c in range(10):
        assert abs(test_counts[c] - 0.25 * overall[c]) <= 1


def test_digits_deterministic_and_seed_dependent(cfg):
    a = build_datasets(cfg(source="digits", seed=3))
    b = build_datasets(cfg(source="digits", seed=3))
    c = build_datasets(cfg(source="digits", seed=4))
    assert a.train.ids == b.train.ids and a.test.ids == b.test.ids
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.train.labels, b.train.labels)
    assert a.test.ids != c.test.ids


def test_digits_getitem_limit_subset(cfg):
    data = build_datasets(cfg(source="digits", limit=50))
    assert len(data.train) == 50
    full = build_datasets(cfg(source="digits", standardize=False))
    assert data.train.ids == full.train.ids[:50]
    x, y, i = data.train[7]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8)
    assert y.dtype == torch.int64 and y.dim() == 0 and i == 7
    sub = data.train.subset([5, 2])
    assert sub.ids == [data.train.ids[5], data.train.ids[2]]
    assert torch.equal(sub.labels, data.train.labels[[5, 2]])
    np.testing.assert_array_equal(sub.display(0), data.train.display(5))
    # unstandardised digits are pixel/16
    assert float(full.train.inputs.max()) == 1.0 and float(full.train.inputs.min()) == 0.0


def test_standardisation_uses_train_statistics(cfg):
    raw = build_datasets(cfg(source="digits", standardize=False))
    std = build_datasets(cfg(source="digits"))
    mean = raw.train.inputs.double().mean()
    sd = raw.train.inputs.double().std(unbiased=False)
    assert abs(float(std.train.inputs.double().mean())) < 1e-5
    assert abs(float(std.train.inputs.double().std(unbiased=False)) - 1) < 1e-4
    expected_test = (raw.test.inputs.double() - mean) / sd
    assert torch.allclose(std.test.inputs.double(), expected_test, atol=1e-4)
    # test statistics are not used: the test mean is not exactly zero
    assert abs(float(std.test.inputs.double().mean())) > 1e-4


@pytest.mark.parametrize("source, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_idx_files(cfg, tmp_path, source, folder):
    written = write_fake_mnist(tmp_path / "tv", folder, n_train=12, n_test=5)
    data = build_datasets(cfg(source=source, root="tv", standardize=False))
    assert len(data.train) == 12 and len(data.test) == 5
    assert data.input_shape == (1, 28, 28) and data.kind == "image"
    assert data.train.ids == [str(i) for i in range(12)] and data.test.ids == [str(i) for i in range(5)]
    images, labels = written["t10k"]
    assert torch.equal(data.test.labels, torch.from_numpy(labels.astype(np.int64)))
    assert torch.allclose(data.test.inputs[2, 0], torch.from_numpy(images[2]).float() / 255)
    np.testing.assert_array_equal(data.test.display(2), images[2])
    if source == "mnist":
        assert data.class_names == [str(i) for i in range(10)]
    else:
        assert data.class_names[0] == "T-shirt/top" and len(data.class_names) == 10


def test_cifar10_pickle_batches(cfg, tmp_path, monkeypatch):
    written = write_fake_cifar(tmp_path / "c", per_batch=3)
    trust_fake_cifar(monkeypatch, tmp_path / "c")
    data = build_datasets(cfg(source="cifar10", root="c"))
    assert len(data.train) == 15 and len(data.test) == 3
    assert data.input_shape == (3, 32, 32) and data.class_names == CIFAR_NAMES
    batch3, labels3 = written["data_batch_3"]
    assert data.train.labels[7].item() == labels3[1]  # batch 3, second image = train row 7
    image = data.train.display(7)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, batch3[1].reshape(3, 32, 32).transpose(1, 2, 0))
    # standardised per channel with train statistics
    flat = data.train.inputs.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(3), atol=1e-5)


@pytest.mark.parametrize("source", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_torchvision_files_mention_download(cfg, tmp_path, source):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        build_datasets(cfg(source=source, root="empty"))
    message = str(err.value)
    assert "not found" in message and "data.download: true" in message and str(tmp_path / "empty") in message
    assert "\n" not in message


def test_torchvision_root_required(cfg):
    # refused when the config is loaded, before any data is read
    with pytest.raises(ConfigError, match=r"data: source 'mnist' needs data\.root"):
        cfg(source="mnist")


def test_corrupt_cifar_batch(cfg, tmp_path, monkeypatch):
    write_fake_cifar(tmp_path / "c", per_batch=2)
    trust_fake_cifar(monkeypatch, tmp_path / "c")
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_2"):
        build_datasets(cfg(source="cifar10", root="c"))


def test_cifar_checksum_is_checked_before_unpickling(cfg, tmp_path, monkeypatch):
    """A file that differs from the checksum list by one byte is refused with one line,
    and pickle.load is never called on any file."""
    import pickle

    write_fake_cifar(tmp_path / "c", per_batch=2)
    trust_fake_cifar(monkeypatch, tmp_path / "c")
    victim = tmp_path / "c" / "cifar-10-batches-py" / "test_batch"
    blob = bytearray(victim.read_bytes())
    blob[-2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    loads = []
    real = pickle.Unpickler
    monkeypatch.setattr(pickle, "Unpickler", lambda *a, **k: loads.append(1) or real(*a, **k))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: loads.append(1))
    with pytest.raises(DataError) as err:
        build_datasets(cfg(source="cifar10", root="c"))
    message = str(err.value)
    assert str(victim) in message and "MD5 checksum" in message and "\n" not in message
    assert loads == []
    # the real list is torchvision's: the fake files are not the official ones
    monkeypatch.undo()
    from influence_cli.data.builtin import cifar10_checksums

    assert cifar10_checksums()["data_batch_1"] == "c99cafc152244af753f735de768cd75f"
