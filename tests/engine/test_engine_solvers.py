"""Dense (exact) and iterative (LiSSA) strategies against explicit torch.func matrices.

The references here build flat parameters, Jacobians and Hessians with torch.func and
their own flattening code, independent of ParameterLayout and the capture machinery.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from influence_cli.errors import FactorsError, InfluenceError
from influence_cli.engine import (
    DENSE_DAMPING_FACTOR as SOLVER_DAMPING_FACTOR,
    ExactSolver,
    LissaDivergenceError,
    LissaSolver,
    ParameterLayout,
    CurvatureProducts,
    available_strategies,
    fit_exact,
    fit_factors,
    fit_lissa,
    get_strategy,
    load_factors,
    pairwise_scores,
    preconditioned_test_gradients,
    select_modules,
    self_influence,
)
from influence_cli.engine.storage import META_HASH, meta_digest
from engine_helpers import batches, make_cnn, make_data, make_mlp, seeded

F64 = torch.float64


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------- dense references
def _tracked_names(model):
    return list(select_modules(model))


def _unflatten(model, names, theta):
    """Independent flat → params: per layer [W.reshape(d_out, -1) | b], row-major."""
    named = dict(model.named_modules())
    params, offset = {}, 0
    for name in names:
        m = named[name]
        d_out = m.weight.shape[0]
        cols = m.weight[0].numel() + (1 if m.bias is not None else 0)
        block = theta[offset : offset + d_out * cols].reshape(d_out, cols)
        offset += d_out * cols
        params[f"{name}.weight"] = block[:, : m.weight[0].numel()].reshape(m.weight.shape)
        if m.bias is not None:
            params[f"{name}.bias"] = block[:, -1]
    return params


def _flatten_params(model, names):
    named = dict(model.named_modules())
    parts = []
    for name in names:
        m = named[name]
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        if m.bias is not None:
            w = torch.cat([w, m.bias.detach()[:, None]], 1)
        parts.append(w.reshape(-1))
    return torch.cat(parts)


def _logits_fn(model, names):
    base = {k: v.detach() for k, v in model.named_parameters()}

    def f(theta, x):
        return functional_call(model, {**base, **_unflatten(model, names, theta)}, (x,))

    return f


def dense_gn(model, x):
    names = _tracked_names(model)
    f = _logits_fn(model, names)
    theta = _flatten_params(model, names)
    model.eval()
    jac = jacrev(f)(theta, x)  # (N, C, P)
    p = torch.softmax(f(theta, x), -1)
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / len(x)


def dense_hessian(model, x, y):
    names = _tracked_names(model)
    f = _logits_fn(model, names)
    theta = _flatten_params(model, names)
    model.eval()
    return hessian(lambda t: F.cross_entropy(f(t, x), y))(theta)


def dense_grads(model, x, y, measurement="loss"):
    names = _tracked_names(model)
    f = _logits_fn(model, names)
    theta = _flatten_params(model, names)

    def per_example(t):
        z = f(t, x)
        if measurement == "loss":
            return F.cross_entropy(z, y, reduction="none")
        correct = z.gather(1, y[:, None]).squeeze(1)
        others = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf"))
        return -(correct - torch.logsumexp(others, 1))

    model.eval()
    return jacrev(per_example)(theta)  # (N, P)


@pytest.fixture(params=["mlp", "cnn"])
def setup(request):
    if request.param == "mlp":
        model = seeded(make_mlp)
        x, y = make_data((6,), 22)
    else:
        model = seeded(make_cnn)
        x, y = make_data((2, 6, 6), 14)
    return model, x, y


# --------------------------------------------------------------------- products
@pytest.mark.parametrize("curvature", ["gauss_newton", "hessian"])
def test_products_match_dense(setup, curvature):
    model, x, y = setup
    layout = ParameterLayout(select_modules(model))
    products = CurvatureProducts(model, layout, curvature)
    v = torch.randn(3, layout.size, generator=torch.Generator().manual_seed(0), dtype=F64)
    model.eval()
    out = sum(products.product(xb, yb, v) for xb, yb, _ in batches(x, y, 5)) / len(x)
    dense = dense_gn(model, x) if curvature == "gauss_newton" else dense_hessian(model, x, y)
    assert rel(out, v @ dense) < 1e-8


def test_layout_round_trip(setup):
    model, _x, _y = setup
    layout = ParameterLayout(select_modules(model))
    theta = _flatten_params(model, list(layout.slots))
    assert torch.equal(layout.from_params(layout.current()), theta)
    flat = torch.randn(2, layout.size, dtype=F64)
    assert torch.equal(layout.from_params(layout.to_params(flat)), flat)
    assert torch.equal(layout.flatten(layout.unflatten(flat)), flat)


# ------------------------------------------------------------------------ exact
@pytest.mark.parametrize("curvature", ["gauss_newton", "hessian"])
def test_exact_precondition_matches_dense_solve(setup, curvature):
    model, x, y = setup
    seen = []
    solver = fit_exact(model, batches(x, y, 6), curvature=curvature, damping=0.3, dtype=F64,
                       on_batch=lambda s, n: seen.append(s))
    dense = dense_gn(model, x) if curvature == "gauss_newton" else dense_hessian(model, x, y)
    v = torch.randn(4, dense.shape[0], generator=torch.Generator().manual_seed(1), dtype=F64)
    ref = torch.linalg.solve(dense + 0.3 * torch.eye(dense.shape[0], dtype=F64), v.T).T
    assert rel(solver.precondition_flat(v), ref) < 1e-8
    assert solver.damping == 0.3 and set(seen) == {"curvature"}
    if solver.factorization == "cholesky":
        assert rel(solver.self_scores(v), (v * ref).sum(1)) < 1e-8


def test_exact_float32_factor_above_4096_parameters_matches_float64_solve():
    from influence_cli.engine.solvers.exact import work_dtype

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(70, 60), nn.Tanh(), nn.Linear(60, 4))  # 4,504 parameters, float32
    x = torch.randn(40, 70)
    y = torch.randint(0, 4, (40,))
    assert work_dtype(torch.float32, 4504) == torch.float32 and work_dtype(torch.float64, 4504) == F64
    assert work_dtype(torch.float32, 4096) == F64
    solver = fit_exact(model, batches(x, y, 16), damping=0.05, dtype=torch.float32)
    assert solver.factor.dtype == torch.float32 and solver.num_params == 4504
    wide = seeded(lambda: nn.Sequential(nn.Linear(70, 60), nn.Tanh(), nn.Linear(60, 4)))
    wide.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    dense = dense_gn(wide, x.double()) + 0.05 * torch.eye(4504, dtype=F64)
    v = torch.randn(3, 4504, generator=torch.Generator().manual_seed(2))
    ref = torch.linalg.solve(dense, v.double().T).T
    assert rel(solver.precondition_flat(v).double(), ref) < 1e-4
    assert rel(solver.self_scores(v).double(), (v.double() * ref).sum(1)) < 1e-4


def test_exact_auto_damping_is_scaled_mean_eigenvalue(setup):
    model, x, y = setup
    solver = fit_exact(model, batches(x, y, 6), dtype=F64)
    dense = dense_gn(model, x)
    assert solver.damping == pytest.approx(SOLVER_DAMPING_FACTOR * float(torch.trace(dense)) / dense.shape[0], rel=1e-10)
    assert SOLVER_DAMPING_FACTOR == get_strategy("exact").default_damping_factor == get_strategy("lissa").default_damping_factor
    # through fit_factors: damping_factor None = the strategy default, a number overrides it
    via = fit_factors(model, batches(x, y, 6), "exact", dtype=F64, damping_factor=0.5)
    assert via.damping == pytest.approx(0.5 * float(torch.trace(dense)) / dense.shape[0], rel=1e-10)


def test_exact_hessian_lu_fallback(monkeypatch):
    model = seeded(make_mlp)
    x, y = make_data((6,), 22)
    # An untrained MLP's Hessian is indefinite; a tiny damping keeps it so.
    solver = fit_exact(model, batches(x, y, 6), curvature="hessian", damping=1e-8, dtype=F64)
    dense = dense_hessian(model, x, y) + 1e-8 * torch.eye(solver.num_params, dtype=F64)
    assert float(torch.linalg.eigvalsh(dense)[0]) < 0
    assert solver.factorization == "lu"
    v = torch.randn(2, solver.num_params, dtype=F64)
    assert rel(solver.precondition_flat(v), torch.linalg.solve(dense, v.T).T) < 1e-6


@pytest.mark.parametrize("measurement", ["loss", "margin"])
def test_exact_scores_match_dense(setup, measurement):
    model, x, y = setup
    solver = fit_factors(model, batches(x, y, 6), "exact", damping=0.2, dtype=F64)
    assert isinstance(solver, ExactSolver)
    k = dense_gn(model, x) + 0.2 * torch.eye(solver.num_params, dtype=F64)
    g = dense_grads(model, x, y)
    ref_self = (g * torch.linalg.solve(k, g.T).T).sum(1)
    got = self_influence(model, solver, batches(x, y, 5))
    assert rel(got, ref_self) < 1e-8 and bool((got > 0).all())
    xt, yt = x[:4] * 0.7, (y[:4] + 1) % 3
    gt = dense_grads(model, xt, yt, measurement)
    ref_pair = gt @ torch.linalg.solve(k, g.T)
    full = pairwise_scores(model, solver, batches(x, y, 5), xt, yt, measurement=measurement)
    assert full.shape == (4, len(x)) and rel(full, ref_pair) < 1e-8
    top = pairwise_scores(model, solver, batches(x, y, 5), xt, yt, measurement=measurement, top=3)
    values, idx = torch.topk(ref_pair, 3, dim=1)
    assert torch.equal(top.proponent_indices, idx)
    assert torch.allclose(top.proponent_scores, values, rtol=1e-8, atol=0)
    low, low_idx = torch.topk(ref_pair, 3, dim=1, largest=False)
    assert torch.equal(top.opponent_indices, low_idx)
    assert torch.allclose(top.opponent_scores, low, rtol=1e-8, atol=0)


def test_exact_refuses_large_models_before_any_data_pass():
    class Exploding:
        def __iter__(self):
            raise AssertionError("data pass started")

    model = nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 10))
    with pytest.raises(InfluenceError) as info:
        fit_exact(model, Exploding(), max_params=20000)
    msg = str(info.value)
    assert "22,210 parameters" in msg and "influence.exact.max_params = 20,000" in msg and "ekfac" in msg
    with pytest.raises(InfluenceError, match="max_params = 1,000"):
        fit_factors(model, Exploding(), "exact", options={"max_params": 1000})
    with pytest.raises(InfluenceError, match="unknown options"):
        fit_factors(model, Exploding(), "exact", options={"depth": 3})


def test_exact_save_load_round_trip(tmp_path, setup):
    model, x, y = setup
    solver = fit_exact(model, batches(x, y, 6), dtype=F64)
    target = tmp_path / "factors" / "exact"
    solver.save(target, extra_meta={"checkpoint_hash": "abc"})
    meta = json.loads((target / "meta.json").read_text())
    assert meta["strategy"] == "exact" and meta["checkpoint_hash"] == "abc"
    assert meta["curvature"] == "gauss_newton" and meta["num_examples"] == len(x)
    assert set(meta["modules"]) == set(select_modules(model))
    loaded = load_factors(target)
    assert isinstance(loaded, ExactSolver) and loaded.factorization == solver.factorization
    assert torch.equal(loaded.factor, solver.factor) and loaded.damping == solver.damping
    assert torch.allclose(self_influence(model, loaded, batches(x, y, 5)), self_influence(model, solver, batches(x, y, 5)), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="clashes"):
        solver.save(tmp_path / "other", extra_meta={"strategy": "x"})
    with pytest.raises(FactorsError, match="not match"):
        loaded.check_model(seeded(lambda: nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))))
    with pytest.raises(FactorsError):
        other = seeded(make_cnn) if isinstance(model[0], nn.Linear) else seeded(make_mlp)
        self_influence(other, loaded, batches(x, y, 5))
    with pytest.raises(FactorsError, match="missing"):
        load_factors(tmp_path / "nowhere")
    magic = {**meta, "strategy": "magic"}
    (target / "meta.json").write_text(json.dumps({**magic, META_HASH: meta_digest(magic)}))
    with pytest.raises(FactorsError, match="unknown strategy"):
        load_factors(target)
    (target / "meta.json").write_text("{not json")
    with pytest.raises(FactorsError, match="corrupt"):
        load_factors(target)


def test_load_factors_still_reads_block_strategies(tmp_path, setup):
    model, x, y = setup
    factors = fit_factors(model, batches(x, y, 6), "kfac", dtype=F64)
    factors.save(tmp_path / "kfac")
    assert load_factors(tmp_path / "kfac").strategy == "kfac"


def test_strategy_descriptions():
    names = available_strategies()
    assert "exact" in names and "slow" in names["lissa"].lower() and "slow" not in names["exact"].lower()


# ------------------------------------------------------------------------ lissa
class TensorData:
    def __init__(self, x, y):
        self.inputs, self.labels = x, y

    def __len__(self):
        return len(self.labels)


class Loader:
    """A re-iterable loader over a dataset with ``inputs``/``labels`` tensors."""

    def __init__(self, x, y, size):
        self.dataset = TensorData(x, y)
        self.size = size

    def __iter__(self):
        x, y = self.dataset.inputs, self.dataset.labels
        for i in range(0, len(y), self.size):
            yield x[i : i + self.size], y[i : i + self.size]


@pytest.fixture
def one_thread():
    """LiSSA runs thousands of tiny products; on a loaded 2-core machine two OpenMP
    threads make each of them ~30× slower, so these tests use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def convex(one_thread):
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    x, y = make_data((6,), 120, seed=3)
    return model, x, y


def test_lissa_full_batch_matches_dense_solve_on_convex_model(convex):
    model, x, y = convex
    solver = fit_lissa(model, Loader(x, y, 50), depth=400, batch_size=10_000)
    k = dense_gn(model, x)
    assert solver.damping == pytest.approx(SOLVER_DAMPING_FACTOR * float(torch.trace(k)) / k.shape[0], rel=1e-10)
    top = float(torch.linalg.eigvalsh(k)[-1])
    assert solver.lambda_max == pytest.approx(top, rel=1e-2) and solver.lambda_max <= top * (1 + 1e-9)
    v = torch.randn(5, k.shape[0], generator=torch.Generator().manual_seed(2), dtype=F64)
    ref = torch.linalg.solve(k + solver.damping * torch.eye(k.shape[0], dtype=F64), v.T).T
    got = solver.precondition_flat(v)
    assert rel(got, ref) < 1e-2
    assert solver.last_report["final_relative_change"] < 1e-3
    assert "one such system per training example" in solver.cost_note


def test_lissa_stochastic_minibatches_with_repeats(convex):
    model, x, y = convex
    solver = fit_lissa(model, Loader(x, y, 50), depth=400, batch_size=30, repeats=4, seed=5)
    k = dense_gn(model, x)
    v = torch.randn(3, k.shape[0], generator=torch.Generator().manual_seed(2), dtype=F64)
    ref = torch.linalg.solve(k + solver.damping * torch.eye(k.shape[0], dtype=F64), v.T).T
    assert rel(solver.precondition_flat(v), ref) < 0.1
    solver.repeats, solver.depth = 1, 50
    first = solver.precondition_flat(v)
    solver.vector_chunk = 2  # chunks see the same minibatches: same answer
    assert torch.allclose(solver.precondition_flat(v), first, rtol=1e-10, atol=1e-12)


def test_lissa_on_plain_batch_list_and_hessian(convex):
    model, x, y = convex
    # A list of batches (no dataset attribute): the recursion cycles through the batches.
    solver = fit_lissa(model, batches(x, y, 120), curvature="hessian", depth=400)
    k = dense_hessian(model, x, y)  # = GN for a linear model
    v = torch.randn(2, k.shape[0], generator=torch.Generator().manual_seed(4), dtype=F64)
    ref = torch.linalg.solve(k + solver.damping * torch.eye(k.shape[0], dtype=F64), v.T).T
    assert rel(solver.precondition_flat(v), ref) < 1e-2
    # Hutchinson trace: damping within 30% of 0.1 × mean eigenvalue.
    assert solver.damping == pytest.approx(SOLVER_DAMPING_FACTOR * float(torch.trace(k)) / k.shape[0], rel=0.3)


def test_lissa_too_small_scale_diverges_with_advice(convex):
    model, x, y = convex
    solver = fit_lissa(model, Loader(x, y, 50), depth=200, scale=1e-3, batch_size=10_000)
    with pytest.raises(LissaDivergenceError) as info:
        solver.precondition_flat(torch.randn(2, solver.num_params, dtype=F64))
    msg = str(info.value)
    assert "raise influence.lissa.scale (now 0.001; try 0.002) or the damping" in msg
    step = int(msg.split("at step ")[1].split(" ")[0])
    assert step <= 30


def test_lissa_scores_save_load_and_fit_factors(tmp_path, convex):
    model, x, y = convex
    loader = Loader(x, y, 40)
    solver = fit_factors(model, loader, "lissa", damping=0.05, options={"depth": 300, "batch_size": 10_000})
    assert isinstance(solver, LissaSolver)
    solver.save(tmp_path / "lissa", extra_meta={"checkpoint_hash": "h"})
    loaded = load_factors(tmp_path / "lissa")
    assert isinstance(loaded, LissaSolver) and loaded.scale == solver.scale and loaded.damping == 0.05
    with pytest.raises(InfluenceError, match="bind"):
        loaded.precondition_flat(torch.zeros(1, loaded.num_params, dtype=F64))
    k = dense_gn(model, x) + 0.05 * torch.eye(solver.num_params, dtype=F64)
    g = dense_grads(model, x, y)
    ref = (g * torch.linalg.solve(k, g.T).T).sum(1)
    got = self_influence(model, loaded, loader)  # binds model and training data
    assert rel(got, ref) < 1e-2
    xt, yt = x[:3], y[:3]
    pair = pairwise_scores(model, loaded, loader, xt, yt)
    assert rel(pair, dense_grads(model, xt, yt) @ torch.linalg.solve(k, g.T)) < 1e-2


def test_exact_reusable_test_gradients(setup):
    model, x, y = setup
    solver = fit_exact(model, batches(x, y, 6), damping=0.2, dtype=F64)
    xt, yt = x[:3], y[:3]
    grads = preconditioned_test_gradients(model, solver, xt, yt)
    assert set(grads) == set(select_modules(model))
    again = pairwise_scores(model, solver, batches(x, y, 5), xt, yt, test_gradients=grads)
    assert torch.allclose(again, pairwise_scores(model, solver, batches(x, y, 5), xt, yt), rtol=1e-12, atol=0)


def test_lissa_convergence_bound_and_progress(convex):
    """unconverged_fraction = (1 − λ/scale)^(depth+1): checked against the measured error of
    a full-batch run along the flattest eigenvector of the curvature."""
    model, x, y = convex
    loader = Loader(x, y, 50)
    solver = fit_lissa(model, loader, damping=0.05, depth=40, batch_size=10_000)
    expected = (1 - 0.05 / solver.scale) ** 41
    assert solver.unconverged_fraction == pytest.approx(expected, rel=1e-12)
    needed = solver.depth_for(0.1)
    assert (1 - 0.05 / solver.scale) ** (needed + 1) <= 0.1 < (1 - 0.05 / solver.scale) ** needed
    k = dense_gn(model, x)
    evals, evecs = torch.linalg.eigh(k)
    flat = evecs[:, :1].T  # eigenvalue ~0 direction
    exact_sol = flat / (evals[0] + 0.05)
    seen = []
    solver.on_vectors = lambda stage, n: seen.append((stage, n))
    got = solver.precondition_flat(flat)
    reached = float((got @ flat.T) / (exact_sol @ flat.T))
    # Full batch: the Neumann series along an eigenvector is exact arithmetic, so the part
    # not reached is (1 − (μ + λ)/scale)^(depth+1) ≤ the bound at μ = 0.
    assert 1 - reached == pytest.approx((1 - (float(evals[0]) + 0.05) / solver.scale) ** 41, rel=1e-6)
    assert 1 - reached <= solver.unconverged_fraction + 1e-12
    assert seen == [("lissa solves", 1)]
