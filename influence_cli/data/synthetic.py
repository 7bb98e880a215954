"""Seeded Gaussian class clusters of any input shape (tests and benchmarks).

Class means are drawn once from config.seed and scaled so two class means lie about
``separation`` noise standard deviations apart; every example is its class mean plus unit
Gaussian noise. Labels cycle through the classes (balanced within each split) in a seeded random order.
Train and test come from the same draw; ids are row numbers within each split.
"""

from __future__ import annotations

import math

import torch

from influence_cli.config import Config
from influence_cli.errors import DataError

from .dataset import SourceData


def build_synthetic(config: Config) -> SourceData:
    cfg = config.data.synthetic
    shape = tuple(int(s) for s in cfg.shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise DataError(
            f"data.synthetic.shape: {list(shape)} is not supported; use [features] for vectors or [channels, height, width] for images"
        )
    dim = math.prod(shape)
    n = cfg.num_train + cfg.num_test
    generator = torch.Generator().manual_seed(int(config.seed))
    means = torch.randn(cfg.num_classes, dim, generator=generator) * (cfg.separation / math.sqrt(2.0 * dim))
    parts = []
    for size in (cfg.num_train, cfg.num_test):  # balanced within each split
        cycle = torch.arange(size) % cfg.num_classes
        parts.append(cycle[torch.randperm(size, generator=generator)])
    labels = torch.cat(parts)
    x = torch.randn(n, dim, generator=generator)
    x += means[labels]
    x = x.reshape((n,) + shape)
    split = cfg.num_train
    return SourceData(
        train_x=x[:split],
        train_y=labels[:split].clone(),
        train_ids=[str(i) for i in range(split)],
        test_x=x[split:],
        test_y=labels[split:].clone(),
        test_ids=[str(i) for i in range(n - split)],
        class_names=[str(c) for c in range(cfg.num_classes)],
        kind="vector" if len(shape) == 1 else "image",
        feature_names=[f"x{j}" for j in range(dim)] if len(shape) == 1 else None,
        pixel_scale=None,  # display: min-max per image
    )
