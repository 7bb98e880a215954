"""The low-rank query path (query_rank=k) against an explicit dense reference that
truncates each preconditioned query gradient by a full SVD."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import batches, make_data
from torch import nn

from influence_cli.engine import fit_factors, lowrank, pairwise_scores
from influence_cli.engine.lowrank import prefer_factored, rank_k, truncated_svd
from influence_cli.engine.operators import precondition_all
from influence_cli.engine.reference import per_example_gradients
from influence_cli.errors import InfluenceError

F64 = torch.float64


class SizedBatches(list):
    def __init__(self, items, num_examples):
        super().__init__(items)
        self.num_examples = num_examples


def wide_cnn() -> nn.Module:
    # conv: P=36, d_in=28, d_out=16; fc1: 577 → 20; fc2: 21 → 3.
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(576, 20), nn.Tanh(), nn.Linear(20, 3)
    )


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = wide_cnn().double()
    x, y = make_data((3, 6, 6), 24)
    factors = fit_factors(model, batches(x, y, 8), "ekfac", dtype=F64, seed=1)
    return model, x, y, factors


def reference(model, factors, x, y, xt, yt, k):
    """Σ_layers ⟨SVD_k(P(G_t)), G_i⟩ with exact SVD truncation, float64."""
    names = list(factors.layers)
    test = precondition_all(factors, per_example_gradients(model, names, xt, yt))
    train = per_example_gradients(model, names, x, y)
    total = 0
    for name in names:
        m = test[name]
        if k < min(m.shape[1:]):
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            m = u[:, :, :k] @ torch.diag_embed(s[:, :k]) @ vh[:, :k, :]
        total = total + torch.einsum("toi,noi->tn", m, train[name])
    return total


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("eigenbasis", [True, False])
@pytest.mark.parametrize("k", [2, 4, 7])
def test_low_rank_matches_svd_truncation(setup, k, eigenbasis, monkeypatch):
    model, x, y, factors = setup
    xt, yt = x[:5] * 0.8, (y[:5] + 1) % 3
    loader = SizedBatches(batches(x, y, 7), 1) if eigenbasis else batches(x, y, 7)
    ref = reference(model, factors, x, y, xt, yt, k)
    exact = reference(model, factors, x, y, xt, yt, 10_000)
    scores = pairwise_scores(model, factors, loader, xt, yt, query_rank=k)
    # Default power iterations: the randomized truncation is close to the exact one...
    assert rel_err(scores, ref) < 1e-3
    assert rel_err(scores, exact) > 1e-2  # ...and the truncation did something
    # ...and converges to it: with more iterations every contraction path is exact.
    monkeypatch.setattr(lowrank, "ITERATIONS", 25)
    converged = pairwise_scores(model, factors, loader, xt, yt, query_rank=k)
    assert rel_err(converged, ref) < 1e-6


def test_paths_are_exercised():
    # conv (16 × 28, 36 positions, 5 test rows): factored for k=2, dense rank-k for k=4.
    assert prefer_factored(16, 28, 36, 2, 5) and not prefer_factored(16, 28, 36, 4, 5)
    assert prefer_factored(20, 577, 1, 7, 5)


def test_full_rank_equals_exact(setup):
    model, x, y, factors = setup
    xt, yt = x[:4], y[:4]
    exact = pairwise_scores(model, factors, batches(x, y, 7), xt, yt)
    for k in (20, 50):  # ≥ every layer's min(d_out, d_in): nothing is truncated
        low = pairwise_scores(model, factors, batches(x, y, 7), xt, yt, query_rank=k)
        assert rel_err(low, exact) < 1e-6


def test_top_k_and_flat_solver(setup):
    model, x, y, factors = setup
    xt, yt = x[:3], y[:3]
    full = pairwise_scores(model, factors, batches(x, y, 7), xt, yt, query_rank=3)
    top = pairwise_scores(model, factors, batches(x, y, 7), xt, yt, query_rank=3, top=4)
    assert torch.allclose(top.proponent_scores, full.topk(4, dim=1).values)
    # A strategy without the factored form goes through its per-layer export (dense).
    ident = fit_factors(model, batches(x, y, 8), "identity", dtype=F64)
    ref = reference(model, ident, x, y, xt, yt, 3)
    assert rel_err(pairwise_scores(model, ident, batches(x, y, 7), xt, yt, query_rank=3), ref) < 1e-3


def test_truncated_svd_is_the_best_rank_k():
    g = torch.Generator().manual_seed(3)
    # A decaying spectrum, as preconditioned gradients have.
    u, _ = torch.linalg.qr(torch.randn(6, 40, 40, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(6, 60, 40, generator=g, dtype=F64))
    s = 0.7 ** torch.arange(40, dtype=F64)
    m = u @ torch.diag_embed(s.expand(6, 40)) @ v.transpose(1, 2)
    uu, sv = truncated_svd(m, 5)
    best = u[:, :, :5] @ torch.diag_embed(s[:5].expand(6, 5)) @ v[:, :, :5].transpose(1, 2)
    assert rel_err(uu @ sv.transpose(1, 2), best) < 1e-6
    assert rank_k(m, 40) is m


def test_refuses_bad_rank(setup):
    model, x, y, factors = setup
    for bad in (-1, 2.5, True):
        with pytest.raises(InfluenceError, match="query_rank"):
            pairwise_scores(model, factors, batches(x, y, 7), x[:2], y[:2], query_rank=bad)
