"""CSV and JSON files of the audit, written through the one atomic writer (:mod:`influence_cli.run`).

File format choices
-------------------
* Every file is written atomically (:func:`influence_cli.run.atomic_path`): to a temporary
  file in the destination folder, then moved over the destination. A reader never sees half
  a file, an interrupted run leaves the previous file intact, and a write the environment
  refuses (disk full, read-only, ...) is one OutputError naming the file.
* CSV: UTF-8, ``\\n`` line endings, a header row, no index column. Floats are written with
  Python's shortest round-trip representation (``repr``), so reading a CSV back gives
  bit-identical float64 values; the raw self-influence is always kept (never rounded).
  Booleans are written as ``True``/``False`` (pandas' default; ``pandas.read_csv`` reads
  them back as booleans). ``suggested_label`` is empty for rows that are not flagged.
  Read a ranking back with :func:`read_ranking_csv`, which keeps ids such as ``NA`` or
  ``001`` as strings.
* JSON: UTF-8, indented by 2, numpy scalars/arrays converted to plain numbers/lists and
  non-finite floats written as ``null``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from influence_cli.audit.ranking import SELF_INFLUENCE_COLUMNS
from influence_cli.errors import DataError
from influence_cli.run import atomic_path, atomic_write_text


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    atomic_write_text(Path(path), text)
    return Path(path)


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a frame as CSV atomically: no index, repr floats, ``True``/``False`` booleans."""
    with atomic_path(Path(path)) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        df.to_csv(handle, index=False, lineterminator="\n")
    return Path(path)


def read_ranking_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``self_influence.csv``/``mislabels.csv`` back with the dtypes it was written with."""
    path = Path(path)
    text_columns = ["id", "label_name", "predicted_name", "suggested_label"]
    try:
        df = pd.read_csv(
            path,
            dtype={c: object for c in text_columns},
            keep_default_na=False,
            na_values={c: [] for c in text_columns},
        )
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read the ranking CSV: {exc}") from None
    if list(df.columns) != SELF_INFLUENCE_COLUMNS:
        raise DataError(
            f"{path}: unexpected columns {list(df.columns)}; expected {','.join(SELF_INFLUENCE_COLUMNS)} "
            "(delete the file and rerun `infl self-influence`)"
        )
    for column in text_columns:
        values = ["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in df[column].tolist()]
        df[column] = pd.Series(values, index=df.index, dtype=object)
    df["flagged"] = df["flagged"].map(_parse_bool).astype(bool)
    return df


def _parse_bool(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise DataError(f"flagged: expected True or False, got {value!r}")


def jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays → Python numbers/lists; NaN/inf → None; paths/dates → str."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (os.PathLike, _dt.date, _dt.datetime)):
        return str(obj)
    raise TypeError(f"write_json: cannot serialise {type(obj).__name__}")


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented UTF-8 JSON atomically (numpy values become plain numbers)."""
    text = json.dumps(jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return write_text(path, text)


__all__ = ["jsonable", "read_ranking_csv", "write_csv", "write_json", "write_text"]
