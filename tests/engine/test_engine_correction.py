"""Remove / relabel corrections against independent references.

Multinomial logistic regression (convex), float64, exact strategy with damping equal to
the L2 term of training: the one-step correction must predict the parameters that
L-BFGS retraining to convergence reaches, and the predicted loss change of a removed
example must follow leave-one-out retraining. The summed-then-preconditioned step of
every strategy must equal the sum of per-example preconditioned gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_helpers import batches, make_data, seeded, make_cnn, make_mlp
from influence_cli.engine import fit_factors, preconditioned_test_gradients
from influence_cli.engine.correction import (
    apply_correction,
    correct_model,
    correction_direction,
    mean_loss,
    untracked_parameters,
)
from influence_cli.errors import InfluenceError

N, D, C, L2 = 1000, 5, 3, 0.1


def _blobs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (N,), generator=g)
    centres = torch.randn(C, D, generator=g, dtype=torch.float64) * 1.5
    x = centres[y] + torch.randn(N, D, generator=g, dtype=torch.float64)
    return x, y


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _retrain(x: torch.Tensor, y: torch.Tensor, start: nn.Module | None = None) -> nn.Module:
    """argmin (1/N) Σ CE(x_i, y_i) + L2/2 ‖θ‖² by L-BFGS to convergence (float64).

    Always 1/N with the full training-set size N: removing S sets S's weights to zero
    (Koh & Liang's up-weighting by −1/n), the objective the remove formula's Newton step
    solves. (Re-normalising by N − |S| also raises the relative L2 strength, a change
    the formula does not model.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, C)).double()
    if start is not None:
        model.load_state_dict(start.state_dict())
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-13,
                            tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y, reduction="sum") / N + 0.5 * L2 * sum(p.square().sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return model


@pytest.fixture(scope="module")
def logistic():
    x, y = _blobs()
    model = _retrain(x, y)
    factors = fit_factors(model, batches(x, y, 250), "exact", damping=L2, dtype=torch.float64)
    return model, factors, x, y


def _copy(model: nn.Module) -> nn.Module:
    twin = nn.Sequential(nn.Linear(D, C)).double()
    twin.load_state_dict(model.state_dict())
    return twin


def _relative_error(corrected: nn.Module, retrained: nn.Module, original: nn.Module) -> float:
    change = _flat(retrained) - _flat(original)
    return float((_flat(corrected) - _flat(retrained)).norm() / change.norm())


def test_remove_predicts_retrained_parameters(logistic):
    model, factors, x, y = logistic
    s = torch.tensor([4, 17, 590])
    keep = torch.ones(N, dtype=torch.bool)
    keep[s] = False
    retrained = _retrain(x[keep], y[keep], start=model)
    corrected = _copy(model)
    step = correction_direction(corrected, factors, x[s], y[s], action="remove", num_examples=N)
    apply_correction(corrected, factors.check_model(corrected), step)
    assert _relative_error(corrected, retrained, model) < 0.05


def test_relabel_predicts_retrained_parameters(logistic):
    model, factors, x, y = logistic
    s = torch.tensor([3, 50, 721])
    new = (y[s] + 1) % C
    y_new = y.clone()
    y_new[s] = new
    retrained = _retrain(x, y_new, start=model)
    corrected = _copy(model)
    step = correction_direction(corrected, factors, x[s], y[s], action="relabel", num_examples=N, new_labels=new)
    apply_correction(corrected, factors.check_model(corrected), step)
    assert _relative_error(corrected, retrained, model) < 0.05
    # relabelling towards y' lowers the loss under y' (first order: Σ g'ᵀ Δθ < 0)
    assert step.predicted_loss_change() < 0


def test_single_removal_loss_change_follows_leave_one_out(logistic):
    model, factors, x, y = logistic
    predicted, measured = [], []
    for i in range(0, N, N // 20)[:20]:
        keep = torch.arange(N) != i
        retrained = _retrain(x[keep], y[keep], start=model)
        step = correction_direction(model, factors, x[i : i + 1], y[i : i + 1], action="remove", num_examples=N)
        predicted.append(step.predicted_loss_change())
        with torch.no_grad():
            measured.append(float(F.cross_entropy(retrained(x[i : i + 1]), y[i : i + 1])
                                  - F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])))
    assert len(predicted) == 20
    assert np.corrcoef(predicted, measured)[0, 1] >= 0.95
    assert min(predicted) > 0  # removing an example raises its own loss


class _ScaledBound:
    """A bound preconditioner whose P is multiplied by ``factor`` (forces a bad step)."""

    def __init__(self, bound, factor: float):
        self.bound, self.factor, self.modules = bound, factor, bound.modules

    def test_side(self, *args):
        return self.bound.test_side(*args)

    def export_side(self, side):
        return {k: v * self.factor for k, v in self.bound.export_side(side).items()}


class _Scaled:
    def __init__(self, inner, factor: float):
        self.inner, self.factor, self.strategy = inner, factor, inner.strategy

    def check_model(self, model):
        return self.inner.check_model(model)

    def bind(self, model, device, *, loader=None, on_batch=None):
        return _ScaledBound(self.inner.bind(model, device, loader=loader), self.factor)


def _relabel_objective(x, y, s, new):
    """The training objective on the relabelled set: mean loss + L2/2 ‖θ‖²."""
    y_new = y.clone()
    y_new[s] = new
    return lambda m: mean_loss(m, x, y_new) + 0.5 * L2 * float(_flat(m).square().sum())


def test_backtracking_halves_an_overshooting_step(logistic):
    model, factors, x, y = logistic
    s = torch.tensor([3, 50, 721])
    new = (y[s] + 1) % C
    objective = _relabel_objective(x, y, s, new)
    full = correction_direction(model, factors, x[s], y[s], action="relabel", num_examples=N, new_labels=new)
    corrected = _copy(model)
    scaled = correction_direction(corrected, _Scaled(factors, 6.0), x[s], y[s], action="relabel", num_examples=N,
                                  new_labels=new)
    result = correct_model(corrected, factors.check_model(corrected), scaled, objective)
    assert result.halvings >= 1 and 0 < result.scale < 1
    assert [t[0] for t in result.tried] == [2.0 ** -k for k in range(result.halvings + 1)]
    assert all(v > result.objective_before for _s, v in result.tried[:-1])
    assert result.objective_after <= result.objective_before
    expected = _copy(model)
    apply_correction(expected, factors.check_model(expected), full, 6.0 * result.scale)
    torch.testing.assert_close(_flat(corrected), _flat(expected))


def test_backtracking_gives_up_and_leaves_the_model_unchanged(logistic):
    model, factors, x, y = logistic
    s = torch.tensor([3, 50, 721])
    new = (y[s] + 1) % C
    corrected = _copy(model)
    huge = correction_direction(corrected, _Scaled(factors, 1e4), x[s], y[s], action="relabel", num_examples=N,
                                new_labels=new)
    result = correct_model(corrected, factors.check_model(corrected), huge, _relabel_objective(x, y, s, new),
                           max_halvings=3)
    assert result.scale == 0.0 and len(result.tried) == 4
    torch.testing.assert_close(_flat(corrected), _flat(model), rtol=0, atol=1e-12)


def test_a_good_step_is_kept_whole(logistic):
    model, factors, x, y = logistic
    s = torch.tensor([3, 50, 721])
    new = (y[s] + 1) % C
    corrected = _copy(model)
    step = correction_direction(corrected, factors, x[s], y[s], action="relabel", num_examples=N, new_labels=new)
    result = correct_model(corrected, factors.check_model(corrected), step, _relabel_objective(x, y, s, new))
    assert result.scale == 1.0 and result.halvings == 0
    assert result.objective_after < result.objective_before


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "exact"])
@pytest.mark.parametrize("make", [make_mlp, make_cnn])
def test_summed_step_equals_sum_of_preconditioned_gradients(strategy, make):
    """One preconditioned product of Σg per layer == Σ of per-example P g_i (any strategy,
    conv column orders included)."""
    model = seeded(make)
    shape = (6,) if make is make_mlp else (2, 6, 6)
    x, y = make_data(shape, 20)
    factors = fit_factors(model, batches(x, y, 8), strategy, damping=0.1, dtype=torch.float64)
    s = torch.tensor([1, 5, 6, 13])
    step = correction_direction(model, factors, x[s], y[s], action="remove", num_examples=20)
    per_example = preconditioned_test_gradients(model, factors, x[s], y[s])
    for name, value in per_example.items():
        torch.testing.assert_close(step.step[name], value.sum(0).double() / 20, rtol=1e-9, atol=1e-12)
    new = (y[s] + 1) % 3
    relabel = correction_direction(model, factors, x[s], y[s], action="relabel", num_examples=20, new_labels=new)
    pre_new = preconditioned_test_gradients(model, factors, x[s], new)
    for name in per_example:
        want = -(pre_new[name].sum(0) - per_example[name].sum(0)).double() / 20
        torch.testing.assert_close(relabel.step[name], want, rtol=1e-9, atol=1e-12)


def test_untracked_parameters_are_named_and_left_alone():
    model = seeded(make_mlp)
    x, y = make_data((6,), 20)
    factors = fit_factors(model, batches(x, y, 8), "ekfac", damping=0.1, modules=["4"], dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = correction_direction(model, factors, x[:3], y[:3], action="remove", num_examples=20)
    modules = factors.check_model(model)
    apply_correction(model, modules, step)
    assert untracked_parameters(model, modules) == ["0.weight", "0.bias", "2.weight"]
    after = model.state_dict()
    for name in ("0.weight", "0.bias", "2.weight"):
        assert torch.equal(before[name], after[name])
    assert not torch.equal(before["4.weight"], after["4.weight"])


def test_bad_requests_are_refused(logistic):
    model, factors, x, y = logistic
    with pytest.raises(InfluenceError, match="empty"):
        correction_direction(model, factors, x[:0], y[:0], action="remove", num_examples=N)
    with pytest.raises(InfluenceError, match="action"):
        correction_direction(model, factors, x[:2], y[:2], action="drop", num_examples=N)
    with pytest.raises(InfluenceError, match="new label"):
        correction_direction(model, factors, x[:2], y[:2], action="relabel", num_examples=N)


@pytest.mark.parametrize("make", [make_mlp, make_cnn])
def test_applied_step_matches_its_first_order_prediction(make):
    """A tiny multiple of the step changes S's loss by that multiple of Σ g_iᵀ Δθ: the
    step lands on the right parameters (conv weight layout and bias column included)."""
    model = seeded(make)
    shape = (6,) if make is make_mlp else (2, 6, 6)
    x, y = make_data(shape, 20)
    factors = fit_factors(model, batches(x, y, 8), "ekfac", damping=0.1, dtype=torch.float64)
    s = torch.tensor([2, 7, 11])
    new = (y[s] + 1) % 3
    step = correction_direction(model, factors, x[s], y[s], action="relabel", num_examples=20, new_labels=new)
    with torch.no_grad():
        before = float(F.cross_entropy(model(x[s]), new, reduction="sum"))
    eps = 1e-6
    apply_correction(model, factors.check_model(model), step, eps)
    with torch.no_grad():
        after = float(F.cross_entropy(model(x[s]), new, reduction="sum"))
    assert (after - before) / eps == pytest.approx(step.predicted_loss_change(), rel=1e-3)


def test_lissa_summed_step_equals_sum_of_its_solves():
    """LiSSA's recursion is linear and seeded: one solve of Σg equals Σ of the solves."""
    from influence_cli.engine.batching import test_batches
    from influence_cli.engine.scoring import gradient_batches

    model = seeded(make_mlp)
    x, y = make_data((6,), 20)
    loader = batches(x, y, 8)
    factors = fit_factors(model, loader, "lissa", damping=0.1, dtype=torch.float64, options={"depth": 50})
    s = torch.tensor([1, 5, 6, 13])
    step = correction_direction(model, factors, x[s], y[s], action="remove", num_examples=20, loader=loader)
    bound = factors.bind(model, torch.device("cpu"), loader=loader)
    rows = gradient_batches(model, bound.modules, test_batches(x[s], y[s], torch.device("cpu"), 256))
    per_example = bound.export_side(bound.test_side(rows, len(s), None))
    for name, value in per_example.items():
        torch.testing.assert_close(step.step[name], value.sum(0).double() / 20, rtol=1e-9, atol=1e-12)
