"""Tabular CSV: numeric feature columns plus a label column (and optionally an id column).

ids are the id column's values when data.id_column is set, otherwise the 0-based data row
number within the CSV file the example comes from. Labels may be any strings; class names
are the sorted unique labels (numeric order when all labels are integers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from influence_cli.config import Config
from influence_cli.errors import DataError

from .common import encode_labels, resolve, short_list, sort_class_names, split_indices
from .dataset import SourceData
from .images import read_csv_strings, row_name

_MISSING = {"", "nan", "na", "n/a", "null", "none"}


class _Table:
    def __init__(self, path: Path, ids: list[str], labels: list[str], features: np.ndarray):
        self.path, self.ids, self.labels, self.features = path, ids, labels, features


def _columns_hint(frame) -> str:
    return f"available columns: {short_list(list(frame.columns), 30)}"


def _parse_features(path: Path, frame, columns: list[str]) -> np.ndarray:
    import pandas as pd

    out = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, column in enumerate(columns):
        text = frame[column].str.strip()
        values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            cell = text.iloc[i]
            where = f"{path}: column '{column}' {row_name(i)}"
            if cell.lower() in _MISSING:
                raise DataError(f"{where}: missing or NaN value; fill in a number or drop the row")
            if np.isnan(values[i]):
                raise DataError(
                    f"{where}: '{cell}' is not a number; fix the value or leave the column out of data.feature_columns"
                )
            raise DataError(f"{where}: infinite value '{cell}'; replace it with a finite number or drop the row")
        out[:, j] = values
    return out


def _read_table(config: Config, field: str, feature_columns: Optional[list[str]]) -> tuple[_Table, list[str]]:
    data = config.data
    path = resolve(config, field, kind="file")
    frame = read_csv_strings(path, field)
    if data.label_column not in frame.columns:
        raise DataError(f"{path}: no label column '{data.label_column}' (data.label_column); {_columns_hint(frame)}")
    if data.id_column is not None and data.id_column not in frame.columns:
        raise DataError(f"{path}: no id column '{data.id_column}' (data.id_column); {_columns_hint(frame)}")
    if len(set(frame.columns)) != len(frame.columns):
        dup = next(c for c in frame.columns if list(frame.columns).count(c) > 1)
        raise DataError(f"{path}: column '{dup}' appears twice in the header; give every column a unique name")
    if feature_columns is None:
        if data.feature_columns is not None:
            feature_columns = list(data.feature_columns)
        else:
            skip = {data.label_column, data.id_column}
            feature_columns = [c for c in frame.columns if c not in skip]
    missing = [c for c in feature_columns if c not in frame.columns]
    if missing:
        what = "data.feature_columns" if data.feature_columns is not None else "the training table's feature columns"
        raise DataError(f"{path}: no column '{missing[0]}' (from {what}); {_columns_hint(frame)}")
    if not feature_columns:
        raise DataError(f"{path}: no feature columns besides the label/id columns; add numeric columns or set data.feature_columns")
    if data.label_column in feature_columns or (data.id_column is not None and data.id_column in feature_columns):
        raise DataError("data.feature_columns: must not include data.label_column or data.id_column; remove them")
    if len(frame) == 0:
        raise DataError(f"{path}: the table has no rows (data.{field}); add one row per example")
    labels = [v.strip() for v in frame[data.label_column].tolist()]
    for i, label in enumerate(labels):
        if not label:
            raise DataError(f"{path}: column '{data.label_column}' {row_name(i)}: empty label; give every row a label")
    if data.id_column is not None:
        ids = [v.strip() for v in frame[data.id_column].tolist()]
        seen: dict[str, int] = {}
        for i, value in enumerate(ids):
            if not value:
                raise DataError(f"{path}: column '{data.id_column}' {row_name(i)}: empty id; give every row an id")
            if value in seen:
                raise DataError(
                    f"{path}: column '{data.id_column}' {row_name(i)}: id '{value}' repeats {row_name(seen[value])};"
                    " ids must be unique"
                )
            seen[value] = i
    else:
        ids = [str(i) for i in range(len(frame))]
    features = _parse_features(path, frame, feature_columns)
    return _Table(path, ids, labels, features), feature_columns


def build_table(config: Config) -> SourceData:
    data = config.data
    if data.train_path is not None:
        train, columns = _read_table(config, "train_path", None)
        test, _ = _read_table(config, "test_path", columns)
        class_names = sort_class_names(train.labels)
        train_y = encode_labels(train.labels, class_names, str(train.path))
        test_y = encode_labels(test.labels, class_names, str(test.path), rows=[row_name(i) for i in range(len(test.labels))])
        train_ids, test_ids = train.ids, test.ids
        train_raw, test_raw = train.features, test.features
    else:
        table, columns = _read_table(config, "path", None)
        class_names = sort_class_names(table.labels)
        y = encode_labels(table.labels, class_names, str(table.path))
        train_idx, test_idx = split_indices(y.numpy(), data.test_fraction, config.seed, str(table.path))
        train_ids, test_ids = [table.ids[i] for i in train_idx], [table.ids[i] for i in test_idx]
        train_y, test_y = y[torch.from_numpy(train_idx)], y[torch.from_numpy(test_idx)]
        train_raw, test_raw = table.features[train_idx], table.features[test_idx]
    return SourceData(
        train_x=torch.from_numpy(train_raw.astype(np.float32)),
        train_y=train_y,
        train_ids=train_ids,
        test_x=torch.from_numpy(test_raw.astype(np.float32)),
        test_y=test_y,
        test_ids=test_ids,
        class_names=class_names,
        kind="table",
        feature_names=list(columns),
        pixel_scale=None,
        train_raw=train_raw,
        test_raw=test_raw,
    )
