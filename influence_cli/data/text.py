"""data.source hf_dataset: text with a label column, tokenised with the model's tokenizer.

Reads a ``datasets`` folder written by ``save_to_disk`` (a Dataset, or a DatasetDict with
train/test splits) or CSV / JSON / JSON-lines / parquet files. Every text is padded or
cut to ``data.max_length`` tokens and packed as (3, max_length) — ids, attention mask,
token types — so the split is one tensor like every other source (influence_cli/hf.py
says why). ids are the id column's values, else the 0-based row number in the file or
split the example comes from. The tokenised tensor is what the data fingerprint hashes,
so another tokenizer or max_length invalidates trained checkpoints and factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influence_cli.config import Config
from influence_cli.errors import DataError

from .common import encode_labels, short_list, sort_class_names, split_indices
from .dataset import SourceData

_READERS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def _frame_of(path: Path, field: str, split: str | None) -> Any:
    """A pandas DataFrame of one file, or of one split of a save_to_disk folder."""
    import pandas as pd

    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise DataError(f"{path}: reading a save_to_disk folder needs the hf extra: pip install 'influence-cli[hf]'") from None
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise DataError(f"{path} (data.{field}): not a folder written by datasets' save_to_disk: {exc}") from None
        if isinstance(loaded, datasets.DatasetDict):
            want = split or "train"
            if want not in loaded:
                raise DataError(f"{path} (data.{field}): no '{want}' split; it has {short_list(list(loaded))}")
            loaded = loaded[want]
        return loaded.to_pandas()
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path} (data.{field}): unknown file type '{path.suffix}'; use .csv, .json, .jsonl, .parquet or a save_to_disk folder")
    try:
        if kind == "csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=kind == "jsonl" or _is_lines(path))
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"{path} (data.{field}): cannot read it: {str(exc).splitlines()[0][:200]}") from None


def _is_lines(path: Path) -> bool:
    with open(path, encoding="utf-8") as handle:
        return not handle.read(1).startswith("[")


def _columns(path: Path, frame: Any, config: Config) -> tuple[list[str], list[str], list[str]]:
    """(texts, label strings, ids) of a frame, with one-line errors naming the column."""
    data = config.data
    hint = f"available columns: {short_list([str(c) for c in frame.columns], 30)}"
    for what, column in (("text", data.text_column), ("label", data.label_column)):
        if column not in frame.columns:
            raise DataError(f"{path}: no {what} column '{column}' (data.{what}_column); {hint}")
    if data.id_column is not None and data.id_column not in frame.columns:
        raise DataError(f"{path}: no id column '{data.id_column}' (data.id_column); {hint}")
    if len(frame) == 0:
        raise DataError(f"{path}: no rows; add one row per example")
    texts = ["" if v is None else str(v) for v in frame[data.text_column].tolist()]
    labels = [str(v).strip() for v in frame[data.label_column].tolist()]
    for i, label in enumerate(labels):
        if not label or label.lower() in ("nan", "none"):
            raise DataError(f"{path}: column '{data.label_column}' row {i}: empty label; give every row a label")
    if data.id_column is not None:
        ids = [str(v).strip() for v in frame[data.id_column].tolist()]
        if len(set(ids)) != len(ids):
            raise DataError(f"{path}: column '{data.id_column}' repeats an id; ids must be unique")
    else:
        ids = [str(i) for i in range(len(frame))]
    return texts, labels, ids


def tokenise_texts(config: Config, texts: Sequence[str]) -> torch.Tensor:
    """Packed (N, 3, max_length) float32 tokens of ``texts`` (ids exact below 2**24)."""
    from influence_cli import hf

    packed = hf.tokenise(hf.load_tokenizer(config.model, config.base_dir), texts, config.data.max_length)
    if packed.numel() and int(packed.max()) >= 2**24:
        raise DataError("the tokenizer's vocabulary is larger than 2**24 ids; it cannot be stored exactly")
    return packed.float()


def build_hf_dataset(config: Config) -> SourceData:
    data = config.data
    if data.train_path is not None:
        train_path, test_path = config.resolve_path(data.train_path), config.resolve_path(data.test_path)
        parts = [(_columns(p, _frame_of(_exists(p, f), f, s), config)) for p, f, s in
                 ((train_path, "train_path", "train"), (test_path, "test_path", "test"))]
        (train_t, train_l, train_ids), (test_t, test_l, test_ids) = parts
        where = str(train_path)
    else:
        path = _exists(config.resolve_path(data.path), "path")
        frame = None
        if path.is_dir():
            frame = _split_frames(path)
        if frame is not None:
            (train_t, train_l, train_ids), (test_t, test_l, test_ids) = (_columns(path, f, config) for f in frame)
        else:
            texts, labels, ids = _columns(path, _frame_of(path, "path", None), config)
            names = sort_class_names(labels)
            y = encode_labels(labels, names, str(path)).numpy()
            tr, te = split_indices(y, data.test_fraction, config.seed, str(path))
            train_t, train_l, train_ids = [texts[i] for i in tr], [labels[i] for i in tr], [ids[i] for i in tr]
            test_t, test_l, test_ids = [texts[i] for i in te], [labels[i] for i in te], [ids[i] for i in te]
        where = str(path)
    class_names = sort_class_names(train_l)
    train_y = encode_labels(train_l, class_names, where)
    test_y = encode_labels(test_l, class_names, where, rows=[f"row {i}" for i in range(len(test_l))])
    return SourceData(
        train_x=tokenise_texts(config, train_t), train_y=train_y, train_ids=train_ids,
        test_x=tokenise_texts(config, test_t), test_y=test_y, test_ids=test_ids,
        class_names=class_names, kind="table", feature_names=[data.text_column], pixel_scale=None,
        train_raw=np.array(train_t, dtype=object)[:, None], test_raw=np.array(test_t, dtype=object)[:, None],
        standardize=False,  # token ids are never standardised
    )


def _exists(path: Path, field: str) -> Path:
    if not path.exists():
        raise DataError(f"{path} (data.{field}): not found; check the path (relative paths start at the config's folder)")
    return path


def _split_frames(path: Path) -> tuple[Any, Any] | None:
    """(train, test) frames of a save_to_disk DatasetDict holding both splits, else None."""
    try:
        import datasets
    except ImportError:
        return None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError):
        return None
    if isinstance(loaded, datasets.DatasetDict) and "train" in loaded and "test" in loaded:
        return loaded["train"].to_pandas(), loaded["test"].to_pandas()
    return None
