"""Built-in sets: scikit-learn digits (no download) and the torchvision datasets.

ids are the 0-based row number (as str) within the source: within ``load_digits()`` for
digits (the split keeps the original row numbers), within the official train or test split
for mnist, fashion_mnist and cifar10 (so train id "5" and test id "5" are different images).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from influence_cli.config import Config
from influence_cli.errors import DataError

from .common import split_indices
from .dataset import SourceData

DIGIT_NAMES = [str(i) for i in range(10)]
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST_FILES = ["test_batch"]
CIFAR10_META = "batches.meta"


def build_digits(config: Config) -> SourceData:
    """8x8 handwritten digits from scikit-learn, pixel values 0..16 scaled by 1/16."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    targets = np.asarray(bunch.target, dtype=np.int64)
    train, test = split_indices(targets, config.data.test_fraction, config.seed, "digits")
    y = torch.from_numpy(targets)
    return SourceData(
        train_x=images[torch.from_numpy(train)],
        train_y=y[torch.from_numpy(train)],
        train_ids=[str(i) for i in train.tolist()],
        test_x=images[torch.from_numpy(test)],
        test_y=y[torch.from_numpy(test)],
        test_ids=[str(i) for i in test.tolist()],
        class_names=list(DIGIT_NAMES),
        kind="image",
        pixel_scale=255.0,  # display: (pixel / 16) * 255
    )


def _root(config: Config) -> Path:
    if config.data.root is None:
        raise DataError(
            f"data.root: not set; source '{config.data.source}' needs the folder holding the dataset"
            " (add data.download: true to fetch it there)"
        )
    return config.resolve_path(config.data.root)


def _download_failed(root: Path, name: str, exc: BaseException) -> DataError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DataError(
        f"{root}: could not download {name} ({first}); check the network, or put the files there and set data.download: false"
    )


def _torchvision_idx(config: Config, class_name: str) -> SourceData:
    """MNIST / FashionMNIST from their raw idx-ubyte files under root/<Class>/raw."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, class_name)
    root = _root(config)
    raw = root / class_name / "raw"
    sets = []
    for train in (True, False):
        try:
            sets.append(cls(root=str(root), train=train, download=config.data.download))
        except RuntimeError as exc:
            if "not found" in str(exc).lower():
                files = ", ".join(f"{Path(url).stem}" for url, _ in cls.resources)
                raise DataError(
                    f"{raw}: {class_name} files not found (expected {files}); set data.download: true to fetch them"
                    " (needs network) or fix data.root"
                ) from None
            if config.data.download:
                raise _download_failed(root, class_name, exc) from None
            raise DataError(f"{raw}: cannot read the {class_name} files ({exc}); delete them and set data.download: true") from None
        except OSError as exc:
            if config.data.download:
                raise _download_failed(root, class_name, exc) from None
            raise DataError(f"{raw}: cannot read the {class_name} files ({exc}); delete them and set data.download: true") from None
        except Exception as exc:  # corrupt idx files fail with assertion/value errors inside torchvision
            raise DataError(
                f"{raw}: corrupt {class_name} files ({type(exc).__name__}: {exc}); delete them and set data.download: true"
            ) from None
    parts = []
    for ds in sets:
        data = torch.as_tensor(ds.data)
        targets = torch.as_tensor(ds.targets, dtype=torch.long)
        if data.dim() != 3 or len(data) != len(targets):
            raise DataError(f"{raw}: {class_name} image and label files do not match; delete them and set data.download: true")
        parts.append((data.unsqueeze(1).float().div_(255.0), targets))
    names = DIGIT_NAMES if class_name == "MNIST" else [str(c) for c in cls.classes]
    return SourceData(
        train_x=parts[0][0],
        train_y=parts[0][1],
        train_ids=[str(i) for i in range(len(parts[0][1]))],
        test_x=parts[1][0],
        test_y=parts[1][1],
        test_ids=[str(i) for i in range(len(parts[1][1]))],
        class_names=list(names),
        kind="image",
    )


def build_mnist(config: Config) -> SourceData:
    return _torchvision_idx(config, "MNIST")


def build_fashion_mnist(config: Config) -> SourceData:
    return _torchvision_idx(config, "FashionMNIST")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as exc:
        raise DataError(f"{path}: cannot read this CIFAR-10 batch ({type(exc).__name__}); delete it and set data.download: true") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch (expected a pickled dict); delete it and set data.download: true")
    # Python 2 pickles may carry bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _cifar_batches(folder: Path, files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in files:
        path = folder / name
        entry = _unpickle(path)
        if "data" not in entry or "labels" not in entry:
            raise DataError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels'; delete it and set data.download: true")
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(entry["labels"]):
            raise DataError(f"{path}: CIFAR-10 batch has shape {data.shape}, expected (N, 3072) with N labels")
        images.append(data)
        labels.extend(int(v) for v in entry["labels"])
    x = torch.from_numpy(np.concatenate(images).reshape(-1, 3, 32, 32)).float().div_(255.0)
    return x, torch.tensor(labels, dtype=torch.long)


def cifar10_checksums() -> dict[str, str]:
    """{file name: MD5} of the official CIFAR-10 python files, from torchvision's dataset class."""
    import torchvision.datasets as tvd

    listed = tvd.CIFAR10.train_list + tvd.CIFAR10.test_list + [[tvd.CIFAR10.meta["filename"], tvd.CIFAR10.meta["md5"]]]
    return {str(name): str(md5) for name, md5 in listed}


def verify_cifar10(folder: Path, names: list[str]) -> None:
    """torchvision's checksum test of each file (MD5, streamed), before any unpickling."""
    from torchvision.datasets.utils import check_integrity

    sums = cifar10_checksums()
    for name in names:
        if not check_integrity(str(folder / name), sums.get(name)):
            raise DataError(
                f"{folder / name}: MD5 checksum differs from torchvision's CIFAR-10 file (corrupted, truncated or "
                "not the official file); it is not read: delete it and set data.download: true"
            )


def build_cifar10(config: Config) -> SourceData:
    """CIFAR-10 from torchvision's on-disk layout: root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}.

    torchvision downloads (data.download: true). Every file is checked against
    torchvision's own MD5 list (``check_integrity``) before anything is unpickled, so a
    corrupted, truncated or substituted file is a one-line error, never a pickle load.
    """
    root = _root(config)
    folder = root / CIFAR10_FOLDER
    needed = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES + [CIFAR10_META]
    if config.data.download and not all((folder / f).is_file() for f in needed):
        import torchvision.datasets as tvd

        try:
            tvd.CIFAR10(root=str(root), train=True, download=True)
        except Exception as exc:
            raise _download_failed(root, "CIFAR-10", exc) from None
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{folder}: CIFAR-10 files not found ({', '.join(missing)}); set data.download: true to fetch them"
            " (needs network) or fix data.root"
        )
    verify_cifar10(folder, needed)
    train_x, train_y = _cifar_batches(folder, CIFAR10_TRAIN_FILES)
    test_x, test_y = _cifar_batches(folder, CIFAR10_TEST_FILES)
    meta = _unpickle(folder / CIFAR10_META)
    names = meta.get("label_names")
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{folder / CIFAR10_META}: lacks 'label_names'; delete it and set data.download: true")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return SourceData(
        train_x=train_x,
        train_y=train_y,
        train_ids=[str(i) for i in range(len(train_y))],
        test_x=test_x,
        test_y=test_y,
        test_ids=[str(i) for i in range(len(test_y))],
        class_names=names,
        kind="image",
    )
