"""Helpers shared by the sources: paths, seeded splits, class names, standardisation."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from influence_cli.config import Config
from influence_cli.errors import DataError

_INT = re.compile(r"^[+-]?\d+$")


def resolve(config: Config, field: str, *, kind: str) -> Path:
    """Resolve data.<field> against the config folder; it must exist as a 'file' or 'folder'."""
    value = getattr(config.data, field)
    if value is None:
        raise DataError(f"data.{field}: not set; source '{config.data.source}' needs it")
    path = config.resolve_path(value)
    if kind == "folder":
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "no such folder"
            raise DataError(
                f"{path}: {what} (data.{field}); fix the path (relative paths resolve against the config file's folder)"
            )
    else:
        if not path.is_file():
            what = "is a folder, not a file" if path.exists() else "no such file"
            raise DataError(
                f"{path}: {what} (data.{field}); fix the path (relative paths resolve against the config file's folder)"
            )
    return path


def sort_class_names(values: Iterable[str]) -> list[str]:
    """Sorted unique label strings; when every label is an integer they sort numerically."""
    unique = sorted(set(values))
    if unique and all(_INT.match(v) for v in unique):
        return sorted(unique, key=lambda v: (int(v), v))
    return unique


def split_indices(
    labels: Sequence[int] | np.ndarray, test_fraction: float, seed: int, what: str, *, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (``stratify``: regression targets are not classes), seeded train/test
    split; each part keeps the source order.

    Falls back to an unstratified split (with a warning) when a class is too small to
    stratify. ``what`` names the data in error messages.
    """
    from sklearn.model_selection import train_test_split

    y = np.asarray(labels)
    n = len(y)
    if n == 0:
        raise DataError(f"{what}: no examples found; add data or fix data.path")
    n_test = int(np.ceil(test_fraction * n))
    if n - n_test < 1:
        raise DataError(
            f"data.test_fraction {test_fraction} leaves no training examples out of {n} in {what}; lower it or add data"
        )
    if n_test < 1:
        raise DataError(f"data.test_fraction {test_fraction} leaves no test examples out of {n} in {what}; raise it")
    index = np.arange(n)
    try:
        train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=y if stratify else None)
    except ValueError as exc:
        warnings.warn(f"{what}: cannot stratify the test split ({exc}); using a random seeded split", stacklevel=2)
        train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=None)
        # A class the random split put only into the test part goes back to training: the
        # model could not learn it, and its examples are worth auditing.
        missing = np.isin(y[test], y[train], invert=True)
        if missing.any() and not missing.all():
            train, test = np.concatenate([train, test[missing]]), test[~missing]
    train, test = np.sort(train), np.sort(test)
    if len(test) == 0:
        raise DataError(f"data.test_fraction {test_fraction} leaves no test examples out of {n} in {what}; raise it")
    if len(train) == 0:
        raise DataError(
            f"data.test_fraction {test_fraction} leaves no training examples out of {n} in {what}; lower it or add data"
        )
    return train, test


def standardisation(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (images) or per-feature mean/std of x, shaped to broadcast over one example."""
    if kind == "image":
        dims = [0] + list(range(2, x.dim()))
        shape = (x.shape[1],) + (1,) * (x.dim() - 2)
    else:
        dims = [0]
        shape = tuple(x.shape[1:])
    x64 = x.double()
    mean = x64.mean(dim=dims)
    std = x64.std(dim=dims, unbiased=False) if len(x) > 1 else torch.ones_like(mean)
    std = torch.where(std > 1e-8 * torch.clamp(mean.abs(), min=1.0), std, torch.ones_like(std))
    return mean.reshape(shape).float(), std.reshape(shape).float()


def apply_standardisation(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std, in place on x (which the caller owns)."""
    x.sub_(mean).div_(std)
    return x


def short_list(names: Sequence[str], limit: int = 12) -> str:
    """'a, b, c' — at most ``limit`` names, then '... (N in all)'."""
    names = [str(n) for n in names]
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... ({len(names)} in all)"


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise DataError(f"{where}: label {bad} is outside the {num_classes} classes 0..{num_classes - 1}")


def encode_labels(
    values: Sequence[str], class_names: list[str], where: str, rows: Optional[Sequence[str]] = None
) -> torch.Tensor:
    """Map label strings to indices in class_names; an unknown label is a DataError."""
    lookup = {name: i for i, name in enumerate(class_names)}
    out = np.empty(len(values), dtype=np.int64)
    for j, value in enumerate(values):
        index = lookup.get(value)
        if index is None:
            row = rows[j] if rows is not None else str(j)
            raise DataError(
                f"{where}: {row}: label '{value}' does not occur in the training set (classes: {short_list(class_names)});"
                " fix the label or add training examples of that class"
            )
        out[j] = index
    return torch.from_numpy(out)
