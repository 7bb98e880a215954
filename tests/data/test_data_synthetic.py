"""synthetic source: shapes, kinds, determinism, display."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_cli.data import build_datasets
from influence_cli.errors import DataError


def test_vector_clusters(cfg):
    config = cfg(source="synthetic", synthetic={"num_train": 300, "num_test": 60, "shape": [6], "num_classes": 3, "separation": 8.0})
    data = build_datasets(config)
    assert data.kind == "vector" and data.input_shape == (6,) and data.class_names == ["0", "1", "2"]
    assert len(data.train) == 300 and len(data.test) == 60
    assert data.train.ids[:3] == ["0", "1", "2"] and data.test.ids[-1] == "59"
    assert torch.bincount(data.train.labels).tolist() == [100, 100, 100]
    # well separated: nearest class mean (from train) classifies the test set
    means = torch.stack([data.train.inputs[data.train.labels == c].mean(0) for c in range(3)])
    predicted = torch.cdist(data.test.inputs, means).argmin(1)
    assert (predicted == data.test.labels).float().mean() > 0.9
    shown = data.train.display(0)
    assert list(shown) == [f"x{j}" for j in range(6)]
    again = build_datasets(config)
    assert torch.equal(again.train.inputs, data.train.inputs) and torch.equal(again.test.labels, data.test.labels)


def test_image_shape_and_display(cfg):
    data = build_datasets(cfg(source="synthetic", synthetic={"num_train": 20, "num_test": 4, "shape": [3, 5, 6]}))
    assert data.kind == "image" and data.input_shape == (3, 5, 6)
    image = data.test.display(1)
    assert image.shape == (5, 6, 3) and image.dtype == np.uint8 and image.min() == 0 and image.max() == 255


def test_bad_shape(cfg):
    with pytest.raises(DataError, match="data.synthetic.shape"):
        build_datasets(cfg(source="synthetic", synthetic={"shape": [4, 4]}))


def test_seed_changes_data(cfg):
    a = build_datasets(cfg(source="synthetic", seed=1, synthetic={"num_train": 10, "num_test": 2}))
    b = build_datasets(cfg(source="synthetic", seed=2, synthetic={"num_train": 10, "num_test": 2}))
    assert not torch.equal(a.train.inputs, b.train.inputs)
