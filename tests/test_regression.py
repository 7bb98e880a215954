"""task: regression: the engine's squared-error path against an explicit float64 Hessian,
and the table audit flagging injected outliers end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from influence_cli.engine import fit_factors
from influence_cli.engine.losses import fisher_labels
from influence_cli.engine.scoring import pairwise_scores, self_influence


def _least_squares(n: int = 60, d: int = 4, seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    design = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        w = torch.linalg.lstsq(design, y[:, None]).solution
        w += 0.05  # away from the optimum: gradients are not only the fitted noise
        model.weight.copy_(w[:d].T)
        model.bias.copy_(w[d])
    return model, x, y, design


@pytest.mark.parametrize(
    "strategy,options", [("exact", {"curvature": "gauss_newton"}), ("exact", {"curvature": "hessian"}), ("ekfac", None), ("kfac", None)]
)
def test_linear_regression_matches_explicit_hessian(strategy, options):
    model, x, y, design = _least_squares()
    n, p = design.shape
    lam = 0.05
    residual = (design @ torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]) - y)
    grads = design * residual[:, None]  # autograd-free per-example gradients of ½(f − y)²
    hessian = design.T @ design / n  # of the mean loss: exact for a linear model (GN = Hessian)
    inverse = torch.linalg.inv(hessian + lam * torch.eye(p, dtype=torch.float64))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    factors = fit_factors(model, loader, strategy, damping=lam, dtype=torch.float64, options=options, seed=3)
    got = self_influence(model, factors, loader).double()
    want = torch.einsum("ip,pq,iq->i", grads, inverse, grads)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0.0)
    pairs = pairwise_scores(model, factors, loader, x[:5], y[:5]).double()
    # score(t, i) = g_tᵀ (H + λI)⁻¹ g_i: a positive score is a proponent (sign of the CLI)
    torch.testing.assert_close(pairs, grads[:5] @ inverse @ grads.T, rtol=1e-9, atol=1e-12)


def test_regression_fisher_labels_are_per_example():
    outputs = torch.randn(10, 2, dtype=torch.float64)
    labels = torch.zeros(10, 2)
    whole = fisher_labels(outputs, labels, 7, torch.arange(10))
    halves = torch.cat([fisher_labels(outputs[:4], labels[:4], 7, torch.arange(4)),
                        fisher_labels(outputs[4:], labels[4:], 7, torch.arange(4, 10))])
    torch.testing.assert_close(whole, halves)
    noise = (whole.double() - outputs).abs()
    torch.testing.assert_close(noise, torch.ones_like(noise), rtol=1e-6, atol=1e-6)  # ±1: E[εεᵀ] = I
    assert dtype_is_float(whole) and not torch.equal(whole, fisher_labels(outputs, labels, 8, torch.arange(10)))


def dtype_is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def test_table_regression_flags_injected_outliers(tmp_path):
    from sklearn.metrics import average_precision_score

    from influence_cli.app.scores import run_self_influence
    from influence_cli.app.session import Session
    from influence_cli.config import config_from_dict
    from influence_cli.progress import Reporter

    rng = np.random.default_rng(0)
    n = 300
    x = rng.normal(size=(n, 3))
    y = x @ np.array([1.5, -2.0, 0.7]) + 0.2 * rng.normal(size=n)
    outliers = rng.choice(n, 15, replace=False)
    y[outliers] += rng.choice([-1, 1], 15) * 4.0
    frame = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "target": y, "key": [f"r{i}" for i in range(n)]})
    frame.to_csv(tmp_path / "rows.csv", index=False)
    config = config_from_dict({
        "name": "reg", "task": "regression",
        "data": {"source": "table", "path": str(tmp_path / "rows.csv"), "label_column": "target", "id_column": "key",
                 "test_fraction": 0.2},
        "model": {"arch": "mlp", "hidden_sizes": [16]},
        "train": {"epochs": 60, "lr": 0.01, "batch_size": 32},
        "output": {"dir": str(tmp_path / "runs")},
    })
    result = run_self_influence(Session(config, Reporter()))
    table = result.table
    truth = table["id"].isin({f"r{i}" for i in outliers}).to_numpy()
    assert truth.sum() > 5  # the split keeps most outliers in training
    ap = average_precision_score(truth, table["self_influence"].to_numpy())
    flagged = table[table["flagged"]]
    precision = truth[table["flagged"].to_numpy()].mean()
    print(f"regression outliers: AP {ap:.3f} (chance {truth.mean():.3f}), flagged {len(flagged)}, precision {precision:.3f}")
    assert ap > 0.8, ap  # chance is truth.mean() ≈ 0.05
    assert precision > 0.5
    assert (table["suggested_label"] == "").all() and table["label_prob"].isna().all()
    np.testing.assert_allclose(table["loss"], 0.5 * (table["label"] - table["predicted"]) ** 2, rtol=1e-5)
    assert result.summary["run"]["task"] == "regression" and result.summary["pairs"] == []
    assert len(flagged) == result.summary["run"]["flagged"]


def test_regression_refuses_image_sources():
    from influence_cli.config import config_from_dict
    from influence_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="regression"):
        config_from_dict({"name": "x", "task": "regression", "data": {"source": "digits"}})
