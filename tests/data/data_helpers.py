"""Helpers for the data-layer tests: configs rooted in tmp_path and tiny files on disk.

(A uniquely named module, not conftest, so `import` cannot pick up another conftest.)
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from influence_cli.config import config_from_dict


def make_config(base: Path, seed: int = 0, **data):
    return config_from_dict({"name": "t", "seed": seed, "data": data}, base_dir=base)


def write_image(path: Path, array: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, format=fmt)
    return path


def solid(value: int, size=(4, 5), rgb=True) -> np.ndarray:
    """An image of one colour: (H, W, 3) with channels value, value//2, 255-value (or (H, W))."""
    h, w = size
    if not rgb:
        return np.full((h, w), value, dtype=np.uint8)
    out = np.empty((h, w, 3), dtype=np.uint8)
    out[..., 0], out[..., 1], out[..., 2] = value, value // 2, 255 - value
    return out


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an idx-ubyte file (the MNIST on-disk format): magic, big-endian dims, bytes."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.tobytes())


def write_fake_mnist(root: Path, folder: str, n_train: int, n_test: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[prefix] = (images, labels)
    return out


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_fake_cifar(root: Path, per_batch: int = 3, seed: int = 0) -> dict:
    """torchvision's layout: root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": []}, f)
        out[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return out


def trust_fake_cifar(monkeypatch, root: Path) -> dict:
    """Let the CIFAR-10 reader's checksum test accept the fake files as written now
    (their MD5s stand in for torchvision's list); returns that {name: md5}."""
    import hashlib

    folder = root / "cifar-10-batches-py"
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setattr("influence_cli.data.builtin.cifar10_checksums", lambda: dict(sums))
    return sums


