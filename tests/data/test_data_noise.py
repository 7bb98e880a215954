"""inject_label_noise and its use by build_datasets."""

from __future__ import annotations

import pytest
import torch

from influence_cli.data import build_datasets, inject_label_noise
from influence_cli.errors import DataError


@pytest.fixture
def labels():
    return torch.arange(1000) % 7


@pytest.mark.parametrize("kind", ["uniform", "class_conditional"])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.333, 1.0])
def test_exact_count_and_every_flip_differs(labels, kind, fraction):
    new, flipped = inject_label_noise(labels, 7, fraction, kind, seed=1)
    assert flipped.dtype == torch.bool and new.dtype == torch.int64
    assert int(flipped.sum()) == round(fraction * len(labels))
    assert torch.equal(flipped, new != labels)  # flipped ones all changed, the rest untouched
    assert int(new.min()) >= 0 and int(new.max()) < 7
    assert torch.equal(labels, torch.arange(1000) % 7)  # input not modified


def test_class_conditional_is_one_fixed_mapping(labels):
    new, flipped = inject_label_noise(labels, 7, 0.5, "class_conditional", seed=3)
    mapping = {}
    for old, changed in zip(labels[flipped].tolist(), new[flipped].tolist()):
        assert mapping.setdefault(old, changed) == changed
    assert len(mapping) == 7 and all(k != v for k, v in mapping.items())
    assert sorted(mapping.values()) == list(range(7))  # a derangement: a permutation


def test_uniform_spreads_over_other_classes(labels):
    new, flipped = inject_label_noise(labels, 7, 1.0, "uniform", seed=0)
    targets = {(a, b) for a, b in zip(labels.tolist(), new.tolist())}
    assert len(targets) > 7 * 3  # many (from, to) pairs, not one mapping


def test_seeded_determinism(labels):
    a = inject_label_noise(labels, 7, 0.2, "uniform", seed=5)
    b = inject_label_noise(labels, 7, 0.2, "uniform", seed=5)
    c = inject_label_noise(labels, 7, 0.2, "uniform", seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_two_classes_and_errors():
    y = torch.tensor([0, 1] * 10)
    new, flipped = inject_label_noise(y, 2, 0.5, "class_conditional", seed=0)
    assert torch.equal(new[flipped], 1 - y[flipped]) and int(flipped.sum()) == 10
    with pytest.raises(DataError, match="kind"):
        inject_label_noise(y, 2, 0.5, "sideways", seed=0)
    with pytest.raises(DataError, match="at least 2 classes"):
        inject_label_noise(torch.zeros(5, dtype=torch.long), 1, 0.5, "uniform", seed=0)


def test_build_datasets_fills_noise(cfg):
    clean = build_datasets(cfg(source="digits", limit=200))
    noisy = build_datasets(cfg(source="digits", limit=200, label_noise={"fraction": 0.1, "kind": "class_conditional", "seed": 2}))
    assert noisy.noise is not None and clean.noise is None
    assert noisy.noise.fraction == 0.1 and noisy.noise.kind == "class_conditional" and noisy.noise.seed == 2
    assert int(noisy.noise.flipped.sum()) == 20 and noisy.noise.flipped.shape == (200,)
    assert torch.equal(noisy.noise.original_labels, clean.train.labels)
    assert torch.equal(noisy.train.labels != clean.train.labels, noisy.noise.flipped)
    assert torch.equal(noisy.test.labels, clean.test.labels)  # test labels stay clean
    again = build_datasets(cfg(source="digits", limit=200, label_noise={"fraction": 0.1, "kind": "class_conditional", "seed": 2}))
    assert torch.equal(again.train.labels, noisy.train.labels)
