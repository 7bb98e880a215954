"""data.source: factory — the user's own Dataset, in memory or decoded per batch."""

from __future__ import annotations

import sys
import textwrap

import pytest

from influence_cli.data import build_datasets
from influence_cli.data.lazy import LazyInputs
from influence_cli.errors import DataError

MODULE = '''
import torch
from torch.utils.data import Dataset, TensorDataset

class Squares(Dataset):
    """No .targets: labels come from one pass over the items; a third item is ignored."""
    def __init__(self, n):
        self.n = n
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        return torch.full((2, 3, 3), float(i)), i % 3, "extra"

def one(n=30):
    return Squares(n)

def pair():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=g)
    return TensorDataset(x[:15], torch.arange(15) % 2), TensorDataset(x[15:], torch.arange(5) % 2)

def named():
    train, test = pair()
    return {"train": train, "test": test, "class_names": ["no", "yes"],
            "train_ids": [f"t{i}" for i in range(15)], "test_ids": [f"q{i}" for i in range(5)]}

def broken():
    raise RuntimeError("no data today")

def wrong():
    return [1, 2, 3]
'''


@pytest.fixture
def fcfg(cfg, tmp_path, monkeypatch):
    (tmp_path / "userdata.py").write_text(textwrap.dedent(MODULE))
    sys.modules.pop("userdata", None)

    def build(function, **data):
        return cfg(source="factory", factory=f"userdata:{function}", factory_path=".", **data)

    yield build
    sys.modules.pop("userdata", None)


def test_factory_pair_with_names_and_ids(fcfg):
    data = build_datasets(fcfg("named"))
    assert data.class_names == ["no", "yes"] and data.train.ids[:2] == ["t0", "t1"] and data.test.ids[-1] == "q4"
    assert data.kind == "vector" and data.input_shape == (4,) and data.train.mean is None  # used as given


@pytest.mark.parametrize("in_memory", [True, False])
def test_factory_single_dataset_is_split(fcfg, in_memory):
    data = build_datasets(fcfg("one", test_fraction=0.2, in_memory=in_memory))
    assert len(data.train) == 24 and len(data.test) == 6 and data.class_names == ["0", "1", "2"]
    assert isinstance(data.train.inputs, LazyInputs) == (not in_memory)
    for i in range(len(data.train)):
        row = int(data.train.ids[i])
        assert float(data.train[i][0][0, 0, 0]) == row and int(data.train.labels[i]) == row % 3


def test_factory_fingerprint_is_the_content(fcfg):
    eager = build_datasets(fcfg("pair"))
    lazy = build_datasets(fcfg("pair", in_memory=False))
    assert eager.fingerprint() == build_datasets(fcfg("pair")).fingerprint()
    assert lazy.fingerprint() == build_datasets(fcfg("pair", in_memory=False)).fingerprint()
    other = build_datasets(fcfg("named"))  # same tensors, other ids and class names
    assert other.fingerprint() != eager.fingerprint()


@pytest.mark.parametrize("function,message", [
    ("broken", "'userdata:broken' raised RuntimeError: no data today"),
    ("wrong", "is list, not a torch Dataset"),
    ("missing", "'userdata' has no function 'missing'"),
])
def test_factory_errors_are_one_line(fcfg, function, message):
    with pytest.raises(DataError, match=message):
        build_datasets(fcfg(function))
