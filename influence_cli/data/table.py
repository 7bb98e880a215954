"""Tables (CSV, or parquet by the .parquet/.pq suffix, read with pandas + pyarrow): numeric
feature columns plus a label column (and optionally an id column).

ids are the id column's values when data.id_column is set, otherwise the 0-based data row
number within the file the example comes from. Labels may be any strings; class names
are the sorted unique labels (numeric order when all labels are integers). With
``task: regression`` labels are numbers (the targets).

Categorical columns (``data.categorical_columns``) are one-hot encoded: one feature
``<column>=<category>`` per category seen in the TRAINING rows, categories in
``sort_class_names`` order (numeric when all are integers, else sorted strings), in the
column's place among the features. A test or query row with a category training never saw
encodes as all zeros. The feature names carry the encoding, so `infl score` query rows
(which give the raw column) encode the same way.
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
        self.categorical: dict[str, list[str]] = {}  # column -> raw cells (one-hot encoded later)


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


PARQUET_SUFFIXES = (".parquet", ".pq")


def read_frame(path: Path, field: str):
    """The table as strings ('' for missing cells): CSV, or parquet (needs pyarrow)."""
    if path.suffix.lower() not in PARQUET_SUFFIXES:
        return read_csv_strings(path, field)
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow (or influence-cli[parquet])") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: cannot read the parquet file (data.{field}): {reason}; fix the file") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.astype(object).where(frame.notna(), "").astype(str)


def one_hot(values: list[str], categories: list[str]) -> np.ndarray:
    """(N, K) 0/1 float64 of values over categories; an unseen value is all zeros."""
    lookup = {c: k for k, c in enumerate(categories)}
    out = np.zeros((len(values), len(categories)), dtype=np.float64)
    for i, value in enumerate(values):
        k = lookup.get(value)
        if k is not None:
            out[i, k] = 1.0
    return out


def _encode(table: "_Table", columns: list[str], categories: dict[str, list[str]]) -> tuple[np.ndarray, list[str]]:
    """The feature matrix with each categorical column replaced by its one-hot block."""
    blocks, names = [], []
    for j, column in enumerate(columns):
        if column in categories:
            blocks.append(one_hot(table.categorical[column], categories[column]))
            names.extend(f"{column}={c}" for c in categories[column])
        else:
            blocks.append(table.features[:, j : j + 1])
            names.append(column)
    return np.concatenate(blocks, axis=1), names


def _read_table(config: Config, field: str, feature_columns: Optional[list[str]]) -> tuple[_Table, list[str]]:
    data = config.data
    path = resolve(config, field, kind="file")
    frame = read_frame(path, field)
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
    categorical = list(data.categorical_columns or [])
    unknown = [c for c in categorical if c not in feature_columns]
    if unknown:
        raise DataError(f"{path}: data.categorical_columns names '{unknown[0]}', which is not a feature column; {_columns_hint(frame)}")
    numeric = [c if c not in categorical else None for c in feature_columns]
    features = _parse_features(path, frame, [c for c in numeric if c is not None])
    full = np.zeros((len(frame), len(feature_columns)), dtype=np.float64)
    full[:, [j for j, c in enumerate(numeric) if c is not None]] = features
    table = _Table(path, ids, labels, full)
    table.categorical = {c: [v.strip() for v in frame[c].tolist()] for c in categorical}
    return table, feature_columns


def _targets(table: "_Table", config: Config) -> torch.Tensor:
    """task: regression: the label column as float32 numbers."""
    values = np.empty(len(table.labels), dtype=np.float64)
    for i, cell in enumerate(table.labels):
        try:
            values[i] = float(cell)
        except ValueError:
            raise DataError(
                f"{table.path}: column '{config.data.label_column}' {row_name(i)}: '{cell}' is not a number; "
                "task: regression needs numeric targets"
            ) from None
    return torch.from_numpy(values.astype(np.float32))


def _labels(tables: list["_Table"], config: Config) -> tuple[list[torch.Tensor], list[str]]:
    """Encoded labels of each table (class indices, or regression targets) and the class names."""
    if config.task == "regression":
        return [_targets(t, config) for t in tables], [config.data.label_column]
    class_names = sort_class_names(tables[0].labels)
    out = [encode_labels(tables[0].labels, class_names, str(tables[0].path))]
    for t in tables[1:]:
        out.append(encode_labels(t.labels, class_names, str(t.path), rows=[row_name(i) for i in range(len(t.labels))]))
    return out, class_names


def _subset(table: "_Table", rows: np.ndarray) -> "_Table":
    part = _Table(table.path, [table.ids[i] for i in rows], [table.labels[i] for i in rows], table.features[rows])
    part.categorical = {c: [v[i] for i in rows] for c, v in table.categorical.items()}
    return part


def build_table(config: Config) -> SourceData:
    data = config.data
    if data.train_path is not None:
        train, columns = _read_table(config, "train_path", None)
        test, _ = _read_table(config, "test_path", columns)
        (train_y, test_y), class_names = _labels([train, test], config)
    else:
        table, columns = _read_table(config, "path", None)
        (y,), class_names = _labels([table], config)
        train_idx, test_idx = split_indices(y.numpy(), data.test_fraction, config.seed, str(table.path),
                                            stratify=config.task == "classification")
        train, test = _subset(table, train_idx), _subset(table, test_idx)
        train_y, test_y = y[torch.from_numpy(train_idx)], y[torch.from_numpy(test_idx)]
    train_ids, test_ids = train.ids, test.ids
    categories = {c: sort_class_names(v) for c, v in train.categorical.items()}
    train_raw, names = _encode(train, columns, categories)
    test_raw, _ = _encode(test, columns, categories)
    columns = names
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
