"""Image sources: a folder with one subfolder per class, and a CSV manifest (path,label).

With ``data.in_memory: false`` (auto: above 1 GiB decoded) images are decoded per batch
instead (data/lazy.py). Otherwise every image is decoded once at build time with Pillow (grayscale -> 1 channel, otherwise
RGB -> 3 channels), resized to data.image_size when set. ids are paths: relative to the
given folder for image_folder (posix, e.g. ``cat/001.png``; examples sorted by that path),
the ``path`` cell as written for csv_manifest (examples in CSV row order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from influence_cli.config import Config
from influence_cli.errors import DataError

from .common import encode_labels, resolve, short_list, sort_class_names, split_indices
from .dataset import SourceData

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


# ----------------------------------------------------------------------------- decoding


def _decode(path: Path, grayscale: bool, size: Optional[list[int]]) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if grayscale else "RGB")
            if size is not None:
                height, width = size
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; fix the path or remove the entry") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot decode image ({reason}); remove or replace the file") from None
    return array[:, :, None] if array.ndim == 2 else array


def decode_images(files: list[Path], config: Config, origins: Optional[list[str]] = None) -> torch.Tensor:
    """Decode all files into a float32 (N, C, H, W) tensor in [0, 1].

    origins: where each file is listed (e.g. a manifest row), named in decode errors.
    """
    size = config.data.image_size
    grayscale = config.data.grayscale
    arrays: list[np.ndarray] = []
    for j, path in enumerate(files):
        try:
            array = _decode(path, grayscale, size)
        except DataError as exc:
            if origins is None:
                raise
            raise DataError(f"{origins[j]}: {exc}") from None
        if arrays and array.shape != arrays[0].shape:
            h0, w0 = arrays[0].shape[:2]
            h, w = array.shape[:2]
            raise DataError(
                f"{path}: image is {h}x{w} (height x width) but {files[0]} is {h0}x{w0}; "
                "set data.image_size: [height, width] to resize all images"
            )
        arrays.append(array)
    if not arrays:
        channels = 1 if grayscale else 3
        h, w = size if size is not None else (1, 1)
        return torch.zeros((0, channels, h, w), dtype=torch.float32)
    stacked = torch.from_numpy(np.stack(arrays))  # (N, H, W, C) uint8
    return stacked.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


class _ImageLoader:
    """Decode row j of ``files`` as a float32 (C, H, W) in [0, 1], like decode_images
    (a picklable callable: DataLoader workers may need to pickle it)."""

    def __init__(self, files: list[Path], grayscale: bool, size: Optional[list[int]], shape: tuple[int, ...],
                 origins: Optional[list[str]]):
        self.files, self.grayscale, self.size, self.shape, self.origins = files, grayscale, size, shape, origins

    def __call__(self, j: int) -> torch.Tensor:
        try:
            array = _decode(self.files[j], self.grayscale, self.size)
        except DataError as exc:
            raise DataError(f"{self.origins[j]}: {exc}" if self.origins else str(exc)) from None
        x = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255.0)
        if tuple(x.shape) != self.shape:
            raise DataError(
                f"{self.files[j]}: image is {x.shape[1]}x{x.shape[2]} (height x width) but {self.files[0]} is "
                f"{self.shape[1]}x{self.shape[2]}; set data.image_size: [height, width] to resize all images"
            )
        return x


def images(files: list[Path], config: Config, origins: Optional[list[str]] = None) -> Any:
    """decode_images, or with data.in_memory false (auto: above 1 GiB decoded) a
    LazyInputs that decodes each image when a batch needs it; its fingerprint hashes the
    files' bytes and the decode settings."""
    from .factory import is_lazy
    from .lazy import LazyInputs, hash_files

    if not files:
        return decode_images(files, config, origins)
    first = _ImageLoader(files, config.data.grayscale, config.data.image_size, (), origins)
    array = _decode(files[0], config.data.grayscale, config.data.image_size)
    shape = (array.shape[2], array.shape[0], array.shape[1])
    if not is_lazy(config, len(files), 4 * int(np.prod(shape))):
        return decode_images(files, config, origins)
    first.shape = shape
    settings = f"images grayscale={config.data.grayscale} size={config.data.image_size}"
    return LazyInputs(first, range(len(files)), shape, hash_files(files, settings))


# ----------------------------------------------------------------------------- image_folder


def _scan_folder(folder: Path, field: str) -> tuple[list[str], list[str]]:
    """(relative posix paths sorted, class folder of each) for folder/<class>/**/<image>."""
    entries: list[tuple[str, str]] = []
    for sub in folder.iterdir():
        if not sub.is_dir() or sub.name.startswith("."):
            continue
        for path in sub.rglob("*"):
            rel = path.relative_to(folder)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                entries.append((rel.as_posix(), sub.name))
    if not entries:
        raise DataError(
            f"{folder}: no images in class subfolders (data.{field}); expected {folder}/<class>/<image>"
            f" with extensions {' '.join(e[1:] for e in IMAGE_EXTENSIONS)}"
        )
    entries.sort()
    return [e[0] for e in entries], [e[1] for e in entries]


def build_image_folder(config: Config) -> SourceData:
    data = config.data
    if data.train_path is not None:
        train_root = resolve(config, "train_path", kind="folder")
        test_root = resolve(config, "test_path", kind="folder")
        train_ids, train_cls = _scan_folder(train_root, "train_path")
        test_ids, test_cls = _scan_folder(test_root, "test_path")
        class_names = sorted(set(train_cls))
        unknown = sorted(set(test_cls) - set(class_names))
        if unknown:
            raise DataError(
                f"{test_root / unknown[0]}: class folder '{unknown[0]}' (data.test_path) has no training images in"
                f" {train_root} (classes: {short_list(class_names)}); remove it or add training images of that class"
            )
        train_files = [train_root / r for r in train_ids]
        test_files = [test_root / r for r in test_ids]
    else:
        root = resolve(config, "path", kind="folder")
        ids, classes = _scan_folder(root, "path")
        class_names = sorted(set(classes))
        lookup = {c: i for i, c in enumerate(class_names)}
        train_idx, test_idx = split_indices([lookup[c] for c in classes], data.test_fraction, config.seed, str(root))
        train_ids = [ids[i] for i in train_idx]
        test_ids = [ids[i] for i in test_idx]
        train_cls = [classes[i] for i in train_idx]
        test_cls = [classes[i] for i in test_idx]
        train_files = [root / r for r in train_ids]
        test_files = [root / r for r in test_ids]
    lookup = {c: i for i, c in enumerate(class_names)}
    x = images(train_files + test_files, config)
    n_train = len(train_files)
    return SourceData(
        train_x=_part(x, 0, n_train),
        train_y=torch.tensor([lookup[c] for c in train_cls], dtype=torch.long),
        train_ids=train_ids,
        test_x=_part(x, n_train, len(train_files) + len(test_files)),
        test_y=torch.tensor([lookup[c] for c in test_cls], dtype=torch.long),
        test_ids=test_ids,
        class_names=class_names,
        kind="image",
    )


def _part(x: Any, start: int, stop: int) -> Any:
    """Rows start..stop of a tensor (a view) or of LazyInputs (nothing decoded)."""
    return x[start:stop] if isinstance(x, torch.Tensor) else x.take(range(start, stop))


# ----------------------------------------------------------------------------- csv_manifest


def read_csv_strings(path: Path, field: str):
    """Read a CSV keeping every cell as a string ('' for empty cells); column names stripped."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the CSV is empty (data.{field}); it needs a header row and one row per example") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise DataError(f"{path}: cannot parse the CSV (data.{field}): {reason}; fix the file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read (data.{field}): {exc.strerror or exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def row_name(i: int) -> str:
    """How error messages name 0-based data row i of a CSV (line = header + 1 + i)."""
    return f"row {i} (line {i + 2})"


def _read_manifest(config: Config, field: str) -> tuple[Path, list[str], list[str], list[Path], list[str]]:
    csv_path = resolve(config, field, kind="file")
    frame = read_csv_strings(csv_path, field)
    label_column = config.data.label_column
    for column in ("path", label_column):
        if column not in frame.columns:
            raise DataError(
                f"{csv_path}: missing column '{column}' (columns: {short_list(list(frame.columns))});"
                f" a manifest needs the columns path,{label_column}"
            )
    if len(frame) == 0:
        raise DataError(f"{csv_path}: the manifest has no rows (data.{field}); add one row per image")
    folder = csv_path.parent
    ids: list[str] = []
    labels: list[str] = []
    files: list[Path] = []
    seen: dict[str, int] = {}
    origins: list[str] = []
    for i, (rel, label) in enumerate(zip(frame["path"].tolist(), frame[label_column].tolist())):
        rel, label = rel.strip(), label.strip()
        if not rel:
            raise DataError(f"{csv_path}: {row_name(i)}: empty path; give the image path relative to the CSV's folder")
        if not label:
            raise DataError(f"{csv_path}: {row_name(i)}: empty {label_column}; give every image a label")
        if rel in seen:
            raise DataError(f"{csv_path}: {row_name(i)}: path '{rel}' is already listed in {row_name(seen[rel])}; list each image once")
        seen[rel] = i
        file = folder / rel
        if file.is_dir():
            raise DataError(
                f"{csv_path}: {row_name(i)}: '{rel}' is a folder, not an image file; list image files (relative to the CSV's folder)"
            )
        if not file.is_file():
            raise DataError(
                f"{csv_path}: {row_name(i)}: image file '{rel}' not found (looked for {file}); paths are relative to the CSV's folder"
            )
        ids.append(rel)
        labels.append(label)
        files.append(file)
        origins.append(f"{csv_path}: {row_name(i)}")
    return csv_path, ids, labels, files, origins


def build_csv_manifest(config: Config) -> SourceData:
    data = config.data
    if data.train_path is not None:
        _, train_ids, train_labels, train_files, train_origins = _read_manifest(config, "train_path")
        test_csv, test_ids, test_labels, test_files, test_origins = _read_manifest(config, "test_path")
        class_names = sort_class_names(train_labels)
        train_y = encode_labels(train_labels, class_names, "data.train_path")
        test_y = encode_labels(test_labels, class_names, str(test_csv), rows=[row_name(i) for i in range(len(test_labels))])
    else:
        csv_path, ids, labels, files, origins = _read_manifest(config, "path")
        class_names = sort_class_names(labels)
        y = encode_labels(labels, class_names, str(csv_path))
        train_idx, test_idx = split_indices(y.numpy(), data.test_fraction, config.seed, str(csv_path))
        train_ids, test_ids = [ids[i] for i in train_idx], [ids[i] for i in test_idx]
        train_files, test_files = [files[i] for i in train_idx], [files[i] for i in test_idx]
        train_origins, test_origins = [origins[i] for i in train_idx], [origins[i] for i in test_idx]
        train_y, test_y = y[torch.from_numpy(train_idx)], y[torch.from_numpy(test_idx)]
    x = images(train_files + test_files, config, train_origins + test_origins)
    n_train = len(train_files)
    return SourceData(
        train_x=_part(x, 0, n_train),
        train_y=train_y,
        train_ids=train_ids,
        test_x=_part(x, n_train, len(train_files) + len(test_files)),
        test_y=test_y,
        test_ids=test_ids,
        class_names=class_names,
        kind="image",
    )
