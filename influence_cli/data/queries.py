"""Read the rows of an `infl score TEST.csv` file into model inputs.

Three formats, recognised by their columns:

- ``index[,label][,id]``: rows of the configured test split, by position;
- ``path[,label][,id]``: image files (image sources), paths relative to the CSV;
- the training table's feature columns ``[,label][,id]`` (table and vector sources).

A row without a label (no label column, or an empty cell) is measured against the model's
predicted label. Every bad row gets a DataError naming the CSV and the row.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from influence_cli.config import Config
from influence_cli.errors import DataError

from .common import apply_standardisation
from .dataset import Datasets
from .images import _decode


@dataclass
class QueryRows:
    """Inputs to score, with labels where the CSV gave them (-1 where it did not)."""

    inputs: torch.Tensor  # (T, *input_shape), prepared exactly like the training inputs
    labels: torch.Tensor  # (T,) int64, -1 = no label given
    ids: list[str]
    source_format: str  # "index" | "path" | "features"
    indices: Optional[list[int]] = None  # rows of the test split, when the CSV gave an 'index' column

    @property
    def has_label(self) -> torch.Tensor:
        return self.labels >= 0


def _row(path: Path, i: int) -> str:
    return f"{path}: row {i + 1} (line {i + 2})"


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a CSV file; give the CSV of test rows to score")
    if not path.is_file():
        raise DataError(f"{path}: no such file; give the CSV of test rows to score")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV: {exc}") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{path}: empty CSV; the first line must name the columns (index, path or the features)")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    if not body:
        raise DataError(f"{path}: no rows below the header")
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise DataError(f"{_row(path, i)}: has {len(row)} fields but the header has {len(header)}")
    return header, body


def _label(path: Path, i: int, cell: str, class_names: list[str]) -> int:
    cell = cell.strip()
    if cell == "":
        return -1
    if cell in class_names:
        return class_names.index(cell)
    raise DataError(f"{_row(path, i)}: unknown label '{cell}' (classes: {', '.join(class_names[:20])})")


def _one_hot_sources(names: list[str], columns: dict[str, int], config: Config) -> dict[str, tuple[str, str]]:
    """{feature '<column>=<category>': (column, category)} for the categorical columns the
    CSV gives raw (encoded like the training table: data/table.py)."""
    out = {}
    for column in config.data.categorical_columns or []:
        if column not in columns:
            continue
        for name in names:
            if name.startswith(f"{column}=") and name not in columns:
                out[name] = (column, name[len(column) + 1 :])
    return out


def read_query_rows(csv_path: Path, config: Config, datasets: Datasets) -> QueryRows:
    """Parse the CSV into QueryRows prepared like the training inputs."""
    header, body = _read(csv_path)
    columns = {name: j for j, name in enumerate(header)}
    class_names = list(datasets.class_names)
    label_col = "label" if "label" in columns else (config.data.label_column if config.data.label_column in columns else None)
    labels = [(_label(csv_path, i, row[columns[label_col]], class_names) if label_col else -1) for i, row in enumerate(body)]
    ids_given = [row[columns["id"]].strip() for row in body] if "id" in columns else None

    if "index" in columns:
        test = datasets.test
        picks = []
        for i, row in enumerate(body):
            cell = row[columns["index"]].strip()
            try:
                k = int(cell)
            except ValueError:
                raise DataError(f"{_row(csv_path, i)}: index '{cell}' is not an integer") from None
            if not 0 <= k < len(test):
                raise DataError(f"{_row(csv_path, i)}: index {k} is out of range (the test split has {len(test)} rows)")
            picks.append(k)
        inputs = test.inputs[picks]
        # Without a label column the test split's own labels are used.
        if label_col is None:
            labels = [int(test.labels[k]) for k in picks]
        ids = ids_given or [f"test/{test.ids[k]}" for k in picks]
        return QueryRows(inputs, torch.tensor(labels, dtype=torch.long), ids, "index", indices=picks)

    if "path" in columns:
        if datasets.kind != "image":
            raise DataError(f"{csv_path}: a 'path' column needs an image data source; use 'index' or the feature columns")
        arrays = []
        for i, row in enumerate(body):
            image_path = (csv_path.parent / row[columns["path"]].strip()).resolve()
            if not image_path.is_file():
                raise DataError(f"{_row(csv_path, i)}: image file {image_path} not found")
            try:
                array = _decode(image_path, config.data.grayscale, config.data.image_size)
            except DataError as exc:
                raise DataError(f"{_row(csv_path, i)}: {exc}") from None
            x = torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)
            if tuple(x.shape) != tuple(datasets.input_shape):
                raise DataError(
                    f"{_row(csv_path, i)}: image has shape {tuple(x.shape)} but the model expects {tuple(datasets.input_shape)} "
                    "(set data.image_size or use images like the training ones)"
                )
            arrays.append(x)
        inputs = torch.stack(arrays)
        ids = ids_given or [row[columns["path"]].strip() for row in body]
    else:
        names = datasets.train.feature_names or [f"x{j}" for j in range(int(np.prod(datasets.input_shape)))]
        one_hot = _one_hot_sources(names, columns, config)
        missing = [n for n in names if n not in columns and n not in one_hot]
        if missing:
            raise DataError(
                f"{csv_path}: missing columns {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; "
                "give 'index' (rows of the test split), 'path' (images) or every feature column"
            )
        values = np.empty((len(body), len(names)), dtype=np.float64)
        for i, row in enumerate(body):
            for j, name in enumerate(names):
                if name in one_hot:  # a one-hot feature '<column>=<category>' of a raw categorical cell
                    column, category = one_hot[name]
                    values[i, j] = 1.0 if row[columns[column]].strip() == category else 0.0
                    continue
                cell = row[columns[name]].strip()
                try:
                    values[i, j] = float(cell)
                except ValueError:
                    raise DataError(f"{_row(csv_path, i)}: column '{name}' value '{cell}' is not a number") from None
                if not np.isfinite(values[i, j]):
                    raise DataError(f"{_row(csv_path, i)}: column '{name}' is not finite ('{cell}')")
        inputs = torch.from_numpy(values).float().reshape(len(body), *datasets.input_shape)
        ids = ids_given or [str(i) for i in range(len(body))]
    train = datasets.train
    if train.mean is not None and train.std is not None:
        inputs = apply_standardisation(inputs.clone(), train.mean, train.std)
    return QueryRows(inputs.float(), torch.tensor(labels, dtype=torch.long), ids, "path" if "path" in columns else "features")
