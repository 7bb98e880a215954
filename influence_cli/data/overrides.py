"""Label overrides: a CSV of ``id,label`` rows that replace those training labels.

Why: `infl fix --action relabel` corrects labels without touching the user's data files;
a config points ``data.label_overrides`` at the file it wrote. The overrides are applied
after the decoded-data cache (so editing the file never needs a re-decode), and the
training split's fingerprint covers the new labels, so every cached checkpoint and
factor trained on the old labels is seen as stale.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import torch

from influence_cli.errors import DataError

from .dataset import Datasets

COLUMNS = ("id", "label")


def label_index(value: str, class_names: list[str], where: str) -> int:
    """A class given by name (or, failing that, by its integer index) → its index."""
    text = str(value).strip()
    if text in class_names:
        return class_names.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(class_names):
        return int(text)
    raise DataError(f"{where}: unknown label '{text}'; use one of {', '.join(class_names)}")


def read_label_overrides(path: Path, ids: list[str], class_names: list[str]) -> dict[int, int]:
    """{training row: new label index} from an ``id,label`` CSV, every id and label checked."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
            header = rows[0].keys() if rows else []
    except OSError as exc:
        raise DataError(f"data.label_overrides: cannot read {path}: {exc.strerror or exc}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"data.label_overrides: {path} is not a readable CSV: {exc}") from None
    if rows and not set(COLUMNS) <= set(header):
        raise DataError(f"data.label_overrides: {path} needs the columns id,label (has {','.join(header)})")
    position = {i: k for k, i in enumerate(ids)}
    out: dict[int, int] = {}
    for line, row in enumerate(rows, start=2):
        where = f"data.label_overrides: {path} line {line}"
        key = str(row["id"]).strip()
        if key not in position:
            raise DataError(f"{where}: id '{key}' is not a training example")
        out[position[key]] = label_index(row["label"], class_names, where)
    return out


def apply_label_overrides(data: Datasets, path: Path) -> Datasets:
    """The datasets with the overridden training labels (a new object; fingerprints reset)."""
    overrides = read_label_overrides(path, list(data.train.ids), list(data.class_names))
    labels = data.train.labels.clone()
    if overrides:
        rows = torch.tensor(list(overrides), dtype=torch.long)
        labels[rows] = torch.tensor(list(overrides.values()), dtype=torch.long)
    train = dataclasses.replace(data.train, labels=labels)
    return dataclasses.replace(data, train=train, _fingerprints={})


def write_label_overrides_text(ids: list[str], labels: list[str]) -> str:
    """The CSV text of an overrides file (the writer is the caller's atomic one)."""
    lines = ["id,label"]
    for key, label in zip(ids, labels):
        lines.append(",".join(_quote(v) for v in (key, label)))
    return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    text = str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text
