"""Self-influence and pairwise scores against dense references."""

from __future__ import annotations

import pytest
import torch

from influence_cli.errors import FactorsError, InfluenceError
from influence_cli.engine import (
    TopInfluences,
    fit_factors,
    measurement_loss,
    pairwise_scores,
    preconditioned_test_gradients,
    self_influence,
)
from influence_cli.engine.reference import (
    dense_pairwise_scores,
    dense_self_influence,
    per_example_gradients,
)
from engine_helpers import batches, make_branch_cnn, make_data, seeded

F64 = torch.float64
STRATEGIES = ["ekfac", "kfac", "diagonal", "identity"]


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


class SizedBatches(list):
    """A list of batches that declares how many training examples it holds."""

    def __init__(self, items, num_examples):
        super().__init__(items)
        self.num_examples = num_examples


def fitted(setup, strategy, request):
    model, x, y = request.getfixturevalue(setup)
    factors = fit_factors(model, batches(x, y, 6), strategy, dtype=F64, seed=1)
    return model, x, y, factors


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("setup", ["mlp_setup", "cnn_setup"])
def test_self_influence_matches_dense(setup, strategy, request):
    model, x, y, factors = fitted(setup, strategy, request)
    seen = []
    fast = self_influence(model, factors, batches(x, y, 5), on_batch=lambda s, n: seen.append((s, n)))
    ref = dense_self_influence(factors, per_example_gradients(model, list(factors.layers), x, y))
    assert fast.shape == (len(x),)
    assert bool((fast > 0).all())
    assert rel_err(fast, ref) < 1e-5
    assert sum(n for _, n in seen) == len(x) and {s for s, _ in seen} == {"self-influence"}


def test_self_influence_branch_cnn():
    model = seeded(make_branch_cnn)
    x, y = make_data((3, 4, 4), 11)
    factors = fit_factors(model, batches(x, y, 4), "ekfac", dtype=F64)
    fast = self_influence(model, factors, batches(x, y, 4))
    ref = dense_self_influence(factors, per_example_gradients(model, list(factors.layers), x, y))
    assert rel_err(fast, ref) < 1e-5


def test_self_influence_with_float32_factors(mlp_setup):
    model, x, y = mlp_setup
    factors = fit_factors(model, batches(x, y, 6), "ekfac")  # stored in float32
    fast = self_influence(model, factors, batches(x, y, 5))
    ref = dense_self_influence(factors, per_example_gradients(model, list(factors.layers), x, y))
    assert rel_err(fast, ref) < 1e-5


@pytest.mark.parametrize("eigenbasis", [True, False])
@pytest.mark.parametrize("measurement", ["loss", "margin"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("setup", ["mlp_setup", "cnn_setup"])
def test_pairwise_matches_dense(setup, strategy, measurement, eigenbasis, request):
    model, x, y, factors = fitted(setup, strategy, request)
    xt, yt = x[:4] * 0.7, (y[:4] + 1) % 3
    # The test side lives in the eigenbasis when rotating the training side costs fewer
    # flops, which a loader's num_examples steers: 1 → every layer with a basis rotates
    # the training side; unknown (a plain list) → the test side is rotated back instead.
    loader = SizedBatches(batches(x, y, 5), 1) if eigenbasis else batches(x, y, 5)
    full = pairwise_scores(model, factors, loader, xt, yt, measurement=measurement)
    names = list(factors.layers)
    ref = dense_pairwise_scores(
        factors,
        per_example_gradients(model, names, xt, yt, measurement),
        per_example_gradients(model, names, x, y),
    )
    assert full.shape == (4, len(x))
    assert bool((full > 0).any()) and bool((full < 0).any())
    assert rel_err(full, ref) < 1e-5


def test_margin_gradient_is_negative_margin():
    logits = torch.tensor([[2.0, 0.5, -1.0]], dtype=F64, requires_grad=True)
    value = measurement_loss(logits, torch.tensor([0]), "margin")
    expected = -(2.0 - torch.logsumexp(torch.tensor([0.5, -1.0], dtype=F64), 0))
    torch.testing.assert_close(value, expected)


def test_self_pair_equals_self_influence(cnn_setup):
    model, x, y = cnn_setup
    factors = fit_factors(model, batches(x, y, 6), "ekfac", dtype=F64)
    full = pairwise_scores(model, factors, batches(x, y, 4), x, y)
    diag = torch.diagonal(full)
    s = self_influence(model, factors, batches(x, y, 4))
    assert rel_err(diag, s) < 1e-8


def test_self_pair_equals_self_influence_mlp(mlp_setup):
    model, x, y = mlp_setup
    factors = fit_factors(model, batches(x, y, 6), "ekfac", dtype=F64)
    full = pairwise_scores(model, factors, batches(x, y, 4), x, y)
    assert rel_err(torch.diagonal(full), self_influence(model, factors, batches(x, y, 4))) < 1e-8


@pytest.mark.parametrize("k", [1, 3, 30])
def test_top_k_streaming_equals_sorting(mlp_setup, k):
    model, x, y = mlp_setup
    factors = fit_factors(model, batches(x, y, 6), "ekfac", dtype=F64)
    xt, yt = x[:5], y[:5]
    full = pairwise_scores(model, factors, batches(x, y, 4), xt, yt)
    top = pairwise_scores(model, factors, batches(x, y, 4), xt, yt, top=k)
    assert isinstance(top, TopInfluences)
    kk = min(k, len(x))
    values, idx = torch.sort(full, dim=1, descending=True)
    torch.testing.assert_close(top.proponent_scores, values[:, :kk])
    assert torch.equal(top.proponent_indices, idx[:, :kk])
    values, idx = torch.sort(full, dim=1)
    torch.testing.assert_close(top.opponent_scores, values[:, :kk])
    assert torch.equal(top.opponent_indices, idx[:, :kk])
    assert top.proponent_indices.dtype == torch.int64


def test_reused_test_gradients(cnn_setup):
    model, x, y = cnn_setup
    factors = fit_factors(model, batches(x, y, 6), "ekfac", dtype=F64)
    xt, yt = x[:3], y[:3]
    grads = preconditioned_test_gradients(model, factors, xt, yt, batch_size=2)
    assert set(grads) == set(factors.layers)
    assert grads["0"].shape == (3, 3, 19)
    a = pairwise_scores(model, factors, batches(x, y, 5), xt, yt)
    b = pairwise_scores(model, factors, batches(x, y, 5), xt, yt, test_gradients=grads)
    assert rel_err(b, a) < 1e-10


def test_pairwise_progress_and_errors(mlp_setup):
    model, x, y = mlp_setup
    factors = fit_factors(model, batches(x, y, 6), "diagonal", dtype=F64)
    seen = []
    pairwise_scores(model, factors, batches(x, y, 8), x[:2], y[:2], top=2, on_batch=lambda s, n: seen.append((s, n)))
    assert ("test-gradients", 2) in seen and sum(n for s, n in seen if s == "scores") == len(x)
    with pytest.raises(InfluenceError, match="measurement"):
        pairwise_scores(model, factors, batches(x, y, 8), x[:2], y[:2], measurement="acc")
    with pytest.raises(InfluenceError, match="top"):
        pairwise_scores(model, factors, batches(x, y, 8), x[:2], y[:2], top=0)


def test_scores_refuse_factors_of_another_model(mlp_setup, cnn_setup):
    model, x, y = mlp_setup
    factors = fit_factors(model, batches(x, y, 6), "diagonal", dtype=F64)
    cnn, xc, yc = cnn_setup
    with pytest.raises(FactorsError):
        self_influence(cnn, factors, batches(xc, yc, 4))


def test_test_rows_in_groups_match_single_group(mlp_setup):
    model, x, y = mlp_setup
    factors = fit_factors(model, batches(x, y, 6), "kfac", dtype=F64)
    xt, yt = x[:7], y[:7]
    whole = pairwise_scores(model, factors, batches(x, y, 5), xt, yt)
    whole_top = pairwise_scores(model, factors, batches(x, y, 5), xt, yt, top=3)
    grouped = pairwise_scores(model, factors, batches(x, y, 5), xt, yt, test_group_rows=2)
    grouped_top = pairwise_scores(model, factors, batches(x, y, 5), xt, yt, top=3, test_group_rows=2)
    assert rel_err(grouped, whole) < 1e-12
    assert torch.equal(grouped_top.proponent_indices, whole_top.proponent_indices)
    assert torch.equal(grouped_top.opponent_indices, whole_top.opponent_indices)
