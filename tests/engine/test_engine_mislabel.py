"""The mislabel terms and scores against their definitions on dense references:
autograd per-example gradients at both labels and an explicit preconditioner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from influence_cli.audit.scores import SCORES, mislabel_scores
from influence_cli.engine import fit_factors
from influence_cli.engine.factors import dense_preconditioner
from influence_cli.engine.mislabel import mislabel_terms
from influence_cli.engine.reference import per_example_gradients
from engine_helpers import batches, make_branch_cnn, make_cnn, make_data, make_mlp, seeded
from test_engine_solvers import dense_gn, dense_grads, setup  # noqa: F401  (fixture)

F64 = torch.float64


def definitions(g: torch.Tensor, g_alt: torch.Tensor, precondition, loss, loss_alt, n: int) -> dict[str, torch.Tensor]:
    """Each score straight from its definition (flat (N, P) gradients, P applied densely)."""
    pg, pg_alt = precondition(g), precondition(g_alt)
    return {
        "self_influence": (g * pg).sum(1),
        "loss": loss,
        "margin": loss - loss_alt,
        "loo_loss": loss + (g * pg).sum(1) / n,
        "relabel_gain": (g_alt * (pg_alt - pg)).sum(1) / n,
        "loo_margin": loss - loss_alt + (g * (pg - pg_alt)).sum(1) / n,
        "loo_margin_sm": loss - loss_alt + (g * (pg - pg_alt)).sum(1) / (n + (g * pg).sum(1)),
    }


def reference_alternative(model, x, y):
    with torch.no_grad():
        z = model.eval()(x).masked_fill(F.one_hot(y, 3).bool(), float("-inf"))
    return z.argmax(1)


def check(got_terms, ref: dict[str, torch.Tensor], n: int) -> None:
    got = mislabel_scores({k: v.numpy() for k, v in got_terms.items()}, n)
    assert set(got) == set(SCORES)
    for name in SCORES:
        np.testing.assert_allclose(got[name], ref[name].numpy(), rtol=1e-7, atol=1e-10, err_msg=name)


@pytest.fixture(params=["mlp", "cnn", "branch_cnn"])
def block_setup(request):
    """The solver tests' models plus BranchCNN, whose convs take every branch of the
    per-side flop rule (c2 rotates A per position: the two gradients share that rotation)."""
    if request.param == "mlp":
        return seeded(make_mlp), *make_data((6,), 22)
    if request.param == "cnn":
        return seeded(make_cnn), *make_data((2, 6, 6), 14)
    return seeded(make_branch_cnn), *make_data((3, 4, 4), 13)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_block_strategy_scores_match_definitions(block_setup, strategy):
    model, x, y = block_setup
    factors = fit_factors(model, batches(x, y, 6), strategy, dtype=F64, seed=1)
    terms = mislabel_terms(model, factors, batches(x, y, 5))
    alt = reference_alternative(model, x, y)
    assert torch.equal(terms["alternative"], alt) and bool((alt != y).all())
    names = list(factors.layers)
    g_layers = per_example_gradients(model, names, x, y)
    a_layers = per_example_gradients(model, names, x, alt)
    dense = torch.block_diag(*(dense_preconditioner(factors.layers[k]) for k in names))
    g = torch.cat([g_layers[k].reshape(len(x), -1) for k in names], 1).double()
    g_alt = torch.cat([a_layers[k].reshape(len(x), -1) for k in names], 1).double()
    with torch.no_grad():
        z = model(x).double()
    loss, loss_alt = F.cross_entropy(z, y, reduction="none"), F.cross_entropy(z, alt, reduction="none")
    check(terms, definitions(g, g_alt, lambda v: v @ dense, loss, loss_alt, 57), 57)


@pytest.mark.parametrize("whiten", [True, False], ids=["two-solves", "three-passes"])
def test_exact_scores_match_definitions(setup, whiten, monkeypatch):  # noqa: F811
    """Cholesky whitening (two solves) and the generic three-pass loop (what LiSSA and an
    LU-factorised exact take) against the same dense definitions."""
    from influence_cli.engine.solvers.exact import ExactSolver

    model, x, y = setup
    solver = fit_factors(model, batches(x, y, 6), "exact", damping=0.2, dtype=F64)
    from influence_cli.engine.flat import FlatBound

    if not whiten:
        monkeypatch.setattr(ExactSolver, "can_whiten", property(lambda self: False))
    monkeypatch.setattr(FlatBound, "chunk_rows", 7)  # several flushes plus a remainder
    terms = mislabel_terms(model, solver, batches(x, y, 5))
    k = dense_gn(model, x) + 0.2 * torch.eye(solver.num_params, dtype=F64)
    alt = reference_alternative(model, x, y)
    g, g_alt = dense_grads(model, x, y), dense_grads(model, x, alt)
    with torch.no_grad():
        z = model(x).double()
    loss, loss_alt = F.cross_entropy(z, y, reduction="none"), F.cross_entropy(z, alt, reduction="none")
    ref = definitions(g, g_alt, lambda v: torch.linalg.solve(k, v.T).T, loss, loss_alt, len(x))
    check(terms, ref, len(x))
    # relabel_gain is the first-order change of log p(y'|x) under the explicit correction
    n = len(x)
    step = -torch.linalg.solve(k, (g_alt - g).T).T / n  # θ' − θ per example
    np.testing.assert_allclose(mislabel_scores({a: b.numpy() for a, b in terms.items()}, n)["relabel_gain"],
                               (-(g_alt * step).sum(1)).numpy(), rtol=1e-7, atol=1e-12)


def test_loo_margin_sm_is_the_margin_minus_the_duplicate_row_newton_step(setup):  # noqa: F811
    """loo_margin_sm against its derivation, without the Sherman–Morrison formula: one
    Newton step of the summed objective (Hessian n(H + λI)) plus a second copy of row i
    with curvature g gᵀ, Δθ = −(n(H + λI) + g gᵀ)⁻¹ g, solved densely per row; the score
    is the margin z_y' − z_y minus the margin change (g − g')ᵀΔθ."""
    model, x, y = setup
    solver = fit_factors(model, batches(x, y, 6), "exact", damping=0.2, dtype=F64)
    terms = mislabel_terms(model, solver, batches(x, y, 5))
    n = len(x)
    k = dense_gn(model, x) + 0.2 * torch.eye(solver.num_params, dtype=F64)
    alt = reference_alternative(model, x, y)
    g, g_alt = dense_grads(model, x, y), dense_grads(model, x, alt)
    with torch.no_grad():
        z = model(x).double()
    expected = []
    for i in range(n):
        step = -torch.linalg.solve(n * k + torch.outer(g[i], g[i]), g[i])
        expected.append(z[i, alt[i]] - z[i, y[i]] - (g[i] - g_alt[i]) @ step)
    got = mislabel_scores({a: b.numpy() for a, b in terms.items()}, n)
    np.testing.assert_allclose(got["loo_margin_sm"], torch.stack(expected).numpy(), rtol=1e-7, atol=1e-10)
    # first order in 1/n it is loo_margin; the leverage A/n only shrinks the correction
    shift, shift_sm = got["loo_margin"] - got["margin"], got["loo_margin_sm"] - got["margin"]
    np.testing.assert_allclose(shift_sm, shift / (1 + got["self_influence"] / n), rtol=1e-9)
    assert np.all(np.abs(shift_sm) <= np.abs(shift)) and not np.allclose(shift_sm, shift)
