"""data.source: factory — the user's own torch Dataset.

``data.factory: "package.module:function"`` (imported like model.factory, with
``data.factory_path`` put on sys.path and ``data.factory_kwargs`` passed) returns one of:

- a ``torch.utils.data.Dataset`` whose items are ``(input, label, ...)``: the test split
  is cut from it (data.test_fraction, stratified for classification, seeded);
- a ``(train, test)`` pair of Datasets;
- a dict with ``train`` and optionally ``test``, ``class_names``, ``train_ids``, ``test_ids``.

ids default to the row number within the split; class names to "0" .. "C-1". Inputs are
used as the Dataset gives them (``data.standardize`` does not apply: the Dataset's own
transforms already did what it wants). With ``data.in_memory: false`` (or auto above
1 GiB) inputs are decoded per batch; the fingerprint then hashes every decoded input once
per command, streaming (a factory's content is only known by running it).
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from influence_cli.config import Config
from influence_cli.errors import DataError

from .common import split_indices
from .dataset import SourceData
from .lazy import IN_MEMORY_LIMIT_BYTES, LazyInputs


def _parts(result: Any) -> dict[str, Any]:
    if isinstance(result, dict):
        unknown = sorted(set(result) - {"train", "test", "class_names", "train_ids", "test_ids"})
        if "train" not in result or unknown:
            what = f"unknown key '{unknown[0]}'" if unknown else "no 'train' key"
            raise DataError(f"data.factory: the returned dict has {what}; use train, test, class_names, train_ids, test_ids")
        return dict(result)
    if isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(r, Dataset) for r in result):
        return {"train": result[0], "test": result[1]}
    return {"train": result}


def _check_dataset(value: Any, key: str) -> Dataset:
    if not isinstance(value, Dataset) or not hasattr(value, "__len__"):
        raise DataError(f"data.factory: '{key}' is {type(value).__name__}, not a torch Dataset with a length")
    if len(value) == 0:
        raise DataError(f"data.factory: the {key} Dataset is empty")
    return value


def _item(dataset: Dataset, i: int, key: str) -> tuple[torch.Tensor, Any]:
    item = dataset[i]
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"data.factory: {key} item {i} is {type(item).__name__}; items must be (input, label, ...)")
    return torch.as_tensor(item[0], dtype=torch.float32), item[1]


def _labels(dataset: Dataset, regression: bool, workers: int) -> torch.Tensor:
    """Every label: the Dataset's ``targets``/``labels`` attribute when it has one, else
    one pass over its items."""
    for name in ("targets", "labels"):
        value = getattr(dataset, name, None)
        if value is not None and not callable(value):
            try:
                tensor = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError):
                continue
            if tensor.dim() == 1 and len(tensor) == len(dataset):
                return tensor.float() if regression else tensor.long()
    _inputs, labels = _decode_all(dataset, workers, keep_inputs=False)
    return labels.float() if regression else labels.long()


def _decode_all(dataset: Dataset, workers: int, keep_inputs: bool = True) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=256, shuffle=False, num_workers=workers):
        if keep_inputs:
            xs.append(torch.as_tensor(batch[0]).float())
        ys.append(torch.as_tensor(batch[1]))
    return (torch.cat(xs) if keep_inputs else None), torch.cat(ys).reshape(-1)


def _digest_decoded(dataset: Dataset):
    def digest_source(digest: "hashlib._Hash", rows: Sequence[int]) -> None:
        for j in rows:
            x = np.ascontiguousarray(torch.as_tensor(dataset[j][0], dtype=torch.float32).numpy())
            digest.update(memoryview(x).cast("B"))

    return digest_source


def _inputs(dataset: Dataset, rows: Sequence[int], lazy: bool, workers: int) -> Any:
    first, _ = _item(dataset, 0, "train")
    if not lazy:
        x, _ = _decode_all(torch.utils.data.Subset(dataset, list(rows)), workers)
        return x
    return LazyInputs(lambda j: dataset[j][0], rows, tuple(first.shape), _digest_decoded(dataset))


def is_lazy(config: Config, count: int, example_bytes: int) -> bool:
    """data.in_memory → decode per batch? (auto: when the inputs would exceed 1 GiB)."""
    setting = config.data.in_memory
    if setting == "auto":
        return count * example_bytes > IN_MEMORY_LIMIT_BYTES
    return not setting


def build_factory(config: Config) -> SourceData:
    from influence_cli.plugins import import_callable

    data = config.data
    folder = str(config.resolve_path(data.factory_path)) if data.factory_path else None
    function = import_callable(str(data.factory), folder, "data.factory", DataError)
    try:
        result = function(**dict(data.factory_kwargs))
    except Exception as exc:  # the user's code may raise anything
        raise DataError(f"data.factory: '{data.factory}' raised {type(exc).__name__}: {exc}") from None
    return source_from_parts(_parts(result), config)


def source_from_parts(parts: dict[str, Any], config: Config) -> SourceData:
    """SourceData of {train, test?, class_names?, train_ids?, test_ids?} Datasets (the
    factory's result, or the Python API's arguments)."""
    data = config.data
    regression = config.task == "regression"
    workers = int(config.influence.num_workers)
    train = _check_dataset(parts["train"], "train")
    first, _ = _item(train, 0, "train")
    lazy = is_lazy(config, len(train), first.numel() * 4)
    train_y = _labels(train, regression, workers)
    if parts.get("test") is not None:
        test = _check_dataset(parts["test"], "test")
        train_rows, test_rows = np.arange(len(train)), np.arange(len(test))
        test_y = _labels(test, regression, workers)
    else:
        test = train
        train_rows, test_rows = split_indices(train_y.numpy(), data.test_fraction, config.seed, "data.factory",
                                              stratify=not regression)
        test_y = train_y[torch.from_numpy(test_rows)]
        train_y = train_y[torch.from_numpy(train_rows)]
    train_ids = _ids(parts.get("train_ids"), len(train), "train_ids", train_rows)
    test_ids = _ids(parts.get("test_ids"), len(test), "test_ids", test_rows)
    if regression:
        class_names = [data.label_column]
    else:
        count = int(max(int(train_y.max()), int(test_y.max()))) + 1 if len(train_y) else 0
        class_names = [str(c) for c in parts.get("class_names") or range(count)]
    return SourceData(
        train_x=_inputs(train, train_rows, lazy, workers), train_y=train_y, train_ids=train_ids,
        test_x=_inputs(test, test_rows, lazy, workers), test_y=test_y, test_ids=test_ids,
        class_names=class_names, kind="image" if first.dim() == 3 else "vector", pixel_scale=None,
        standardize=False,
    )


def _ids(given: Any, size: int, key: str, rows: np.ndarray) -> list[str]:
    if given is None:
        return [str(int(j)) for j in rows]
    ids = [str(v) for v in given]
    if len(ids) != size:
        raise DataError(f"data.factory: {key} has {len(ids)} ids for {size} examples; give one id per example")
    if len(set(ids)) != len(ids):
        raise DataError(f"data.factory: {key} repeats an id; ids must be unique")
    return [ids[int(j)] for j in rows]
