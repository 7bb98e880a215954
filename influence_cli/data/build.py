"""build_datasets(config): run the source's builder, then the common steps.

Order of the common steps: the source gives its train/test split (each in a stable order)
→ ``data.limit`` keeps the first N training examples → ``data.label_noise`` flips training
labels → ``data.standardize`` scales train and test with the TRAIN statistics.
"""

from __future__ import annotations

from typing import Callable

import torch

from influence_cli.config import Config
from influence_cli.errors import DataError

from .builtin import build_cifar10, build_digits, build_fashion_mnist, build_mnist
from .common import apply_standardisation, check_labels, standardisation
from .dataset import Datasets, ExampleSet, LabelNoise, SourceData
from .factory import build_factory
from .images import build_csv_manifest, build_image_folder
from .lazy import LazyInputs, stream_standardisation
from .noise import inject_label_noise
from .synthetic import build_synthetic
from .table import build_table

SOURCES: dict[str, Callable[[Config], SourceData]] = {
    "digits": build_digits,
    "mnist": build_mnist,
    "fashion_mnist": build_fashion_mnist,
    "cifar10": build_cifar10,
    "image_folder": build_image_folder,
    "csv_manifest": build_csv_manifest,
    "table": build_table,
    "synthetic": build_synthetic,
    "factory": build_factory,
}


def build_datasets(config: Config) -> Datasets:
    """Load config.data into train/test ExampleSets with stable ids and order."""
    data = config.data
    builder = SOURCES.get(data.source)
    if builder is None:
        raise DataError(f"data.source: unknown source '{data.source}'; use one of {', '.join(SOURCES)}")
    src = builder(config)
    return finish(src, config)


def _where(config: Config, test: bool = False) -> str:
    """How messages name the data: the file or folder it came from, else the source."""
    data = config.data
    value = (data.test_path if test else data.train_path) or data.path
    if data.source in ("image_folder", "csv_manifest", "table") and value is not None:
        return str(config.resolve_path(value))
    return f"data.source '{data.source}'"


def check_classes(train_y, test_y, test_ids: list[str], class_names: list[str], config: Config, *, limited: bool) -> None:
    """Refuse a training set with a single class, or a test example of a class that
    training never sees (the model could not learn it), naming the data and the fix."""
    present = set(int(v) for v in train_y.unique().tolist())
    cut = f"data.limit {config.data.limit} keeps " if limited else ""
    if len(present) < 2:
        name = class_names[present.pop()]
        if cut:
            what, fix = f"{cut}training examples of one class only ('{name}')", "raise data.limit"
        else:
            what, fix = f"every training example has the label '{name}'", "add examples of the other classes"
        raise DataError(f"{_where(config)}: {what}; an influence audit needs at least 2 classes: {fix}")
    for i, label in enumerate(test_y.tolist()):
        if int(label) not in present:
            name = class_names[int(label)]
            if cut:
                fix = f"{cut}no training example of class '{name}'; raise data.limit"
            else:
                fix = f"class '{name}' has no training example; add training examples of that class or remove it"
            raise DataError(f"{_where(config, test=True)}: test example '{test_ids[i]}': {fix}")


def finish(src: SourceData, config: Config) -> Datasets:
    """Apply limit, label noise and standardisation to a source's split; check it."""
    data = config.data
    num_classes = len(src.class_names)
    train_x, train_y, train_ids, train_raw = src.train_x, src.train_y, list(src.train_ids), src.train_raw
    lazy = isinstance(train_x, LazyInputs)
    if data.limit is not None and data.limit < len(train_y):
        n = data.limit
        train_x = train_x.take(range(n)) if lazy else train_x[:n]
        train_y, train_ids = train_y[:n], train_ids[:n]
        train_raw = None if train_raw is None else train_raw[:n]
    if len(train_y) == 0:
        raise DataError(f"data.source '{data.source}': no training examples; check data.path / data.train_path")
    if len(src.test_y) == 0:
        raise DataError(f"data.source '{data.source}': no test examples; check data.test_path or raise data.test_fraction")
    test_y = src.test_y
    if config.task == "classification":
        check_labels(train_y, num_classes, f"data.source '{data.source}' (train)")
        check_labels(src.test_y, num_classes, f"data.source '{data.source}' (test)")
        check_classes(train_y, src.test_y, list(src.test_ids), list(src.class_names), config, limited=len(train_y) < len(src.train_y))
    else:
        train_y, test_y = regression_targets(train_y, src.test_y, data.source)

    noise = None
    if data.label_noise.fraction > 0:
        cfg = data.label_noise
        original = train_y.clone()
        train_y, flipped = inject_label_noise(original, num_classes, cfg.fraction, cfg.kind, cfg.seed)
        noise = LabelNoise(flipped=flipped, original_labels=original, fraction=cfg.fraction, kind=cfg.kind, seed=cfg.seed)

    mean = std = None
    test_x = src.test_x
    if lazy:
        if data.standardize and src.standardize:
            mean, std = stream_standardisation(train_x, src.kind, config.influence.num_workers)
            train_x, test_x = train_x.standardised(mean, std), test_x.standardised(mean, std)
    else:
        train_x = train_x.float()
        test_x = test_x.float()
        if data.standardize and src.standardize:
            mean, std = standardisation(train_x, src.kind)
            # In place: the source's tensors are ours; train and test never share elements.
            train_x = apply_standardisation(train_x, mean, std)
            test_x = apply_standardisation(test_x, mean, std)
        train_x, test_x = train_x.contiguous(), test_x.contiguous()

    def make(x, y, ids, raw) -> ExampleSet:
        return ExampleSet(
            inputs=x,
            labels=y,
            ids=ids,
            kind=src.kind,
            feature_names=src.feature_names,
            mean=mean,
            std=std,
            pixel_scale=src.pixel_scale,
            raw=raw,
        )

    return Datasets(
        train=make(train_x, train_y, train_ids, train_raw),
        test=make(test_x, test_y, list(src.test_ids), src.test_raw),
        class_names=list(src.class_names),
        input_shape=tuple(int(s) for s in train_x.shape[1:]),
        kind=src.kind,
        noise=noise,
    )


def regression_targets(train_y: torch.Tensor, test_y: torch.Tensor, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """task: regression labels as float32, every one finite."""
    out = []
    for name, y in (("train", train_y), ("test", test_y)):
        if not y.is_floating_point() and y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise DataError(f"data.source '{source}' ({name}): task: regression needs numeric labels")
        y = y.float()
        if not torch.isfinite(y).all():
            raise DataError(f"data.source '{source}' ({name}): a regression label is NaN or infinite; fix or drop that row")
        out.append(y)
    return out[0], out[1]
