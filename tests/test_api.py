"""The Python API (influence_cli.api.Auditor / infl.Auditor) against the CLI on the same data."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from influence_cli.errors import DataError

FACTORY = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(90, 5, generator=g)
    y = (x[:, 0] - x[:, 2] > 0).long()
    y[:4] = 1 - y[:4]  # a few flipped labels
    return {"train": TensorDataset(x[:70], y[:70]), "test": TensorDataset(x[70:], y[70:]),
            "class_names": ["no", "yes"]}

def model():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
'''


@pytest.fixture()
def user(tmp_path, monkeypatch):
    """A user's module (data + model factories) and a trained model saved as a checkpoint."""
    (tmp_path / "usermod.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usermod", None)
    import usermod

    torch.manual_seed(0)
    model = usermod.model()
    parts = usermod.data()
    x, y = parts["train"].tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    return usermod, model, parts


def test_api_matches_cli(tmp_path, user):
    import infl
    from influence_cli.app.scores import run_self_influence
    from influence_cli.app.session import Session
    from influence_cli.config import config_from_dict
    from influence_cli.progress import Reporter

    usermod, model, parts = user
    loader = DataLoader(parts["train"], batch_size=16, shuffle=False)
    audit = infl.Auditor(model, loader, parts["test"], class_names=["no", "yes"], output_dir=tmp_path / "api",
                         batch_size=32, strategy="ekfac")
    table = audit.self_influence()

    config = config_from_dict({
        "name": "cli", "data": {"source": "factory", "factory": "usermod:data"},
        "model": {"arch": "factory", "factory": "usermod:model", "checkpoint": str(tmp_path / "model.safetensors")},
        "influence": {"batch_size": 32, "strategy": "ekfac"}, "output": {"dir": str(tmp_path / "runs")},
    })
    cli = run_self_influence(Session(config, Reporter())).table
    from influence_cli.audit.ranking import SELF_INFLUENCE_COLUMNS

    assert list(table.columns) == SELF_INFLUENCE_COLUMNS
    pd.testing.assert_frame_equal(table.reset_index(drop=True), cli.reset_index(drop=True))
    # and the scores are the engine's, not a copy of the CLI's file: an independent check
    from influence_cli.engine import fit_factors
    from influence_cli.engine.scoring import self_influence

    factors = fit_factors(model, DataLoader(parts["train"], batch_size=7), "ekfac", seed=0)
    direct = self_influence(model, factors, DataLoader(parts["train"], batch_size=7)).double().numpy()
    by_index = table.sort_values("index")["self_influence"].to_numpy()
    np.testing.assert_allclose(by_index, direct, rtol=1e-4)


def test_api_score_and_report(tmp_path, user):
    from influence_cli.api import Auditor
    from influence_cli.app.explain import SCORE_COLUMNS

    _, model, parts = user
    audit = Auditor(model, parts["train"], parts["test"], output_dir=tmp_path)
    x, y = parts["test"].tensors
    scores = audit.score(x[:3], y[:3], top=4)
    assert list(scores.columns) == SCORE_COLUMNS
    assert set(scores["test_id"]) == {"0", "1", "2"}
    assert (scores[scores.role == "proponent"]["influence"] > 0).all()
    path = audit.report(tmp_path / "r.html", top=5)
    assert path.read_text().startswith("<!DOCTYPE html")


def test_api_refuses_a_shuffled_loader(user):
    from influence_cli.api import Auditor

    _, model, parts = user
    with pytest.raises(DataError, match="RandomSampler.*shuffle=False"):
        Auditor(model, DataLoader(parts["train"], batch_size=8, shuffle=True))


def test_api_takes_tensors_and_regression(tmp_path):
    from influence_cli.api import Auditor

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64).float()
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(40, generator=g)
    y[5] += 8.0
    model = nn.Linear(3, 1)
    with torch.no_grad():  # least squares on the clean rows: row 5 is the outlier
        keep = torch.arange(40) != 5
        design = torch.cat([x[keep], torch.ones(39, 1)], 1)
        solution = torch.linalg.lstsq(design, y[keep, None]).solution
        model.weight.copy_(solution[:3].T)
        model.bias.copy_(solution[3])
    audit = Auditor(model, (x, y), task="regression", output_dir=tmp_path)
    table = audit.self_influence()
    assert int(table.iloc[0]["index"]) == 5
    assert (table["suggested_label"] == "").all()
