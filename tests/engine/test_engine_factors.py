"""Fitting, the unified preconditioner, and factor storage."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from influence_cli.errors import FactorsError, InfluenceError
from influence_cli.engine import (
    STRATEGIES,
    ActivationCapture,
    Factors,
    available_strategies,
    dense_preconditioner,
    fit_factors,
    precondition,
    select_modules,
)
from influence_cli.engine.kernels import reference_rotated_grads, rotated_per_example_grads
from influence_cli.engine.storage import META_HASH, meta_digest
from influence_cli.engine.reference import dense_fisher, per_example_gradients
from influence_cli.engine.tracked import eval_mode, to_weight_order
from engine_helpers import batches, make_branch_cnn, make_cnn, make_data, make_mlp, seeded

F64 = torch.float64


def fit(model, x, y, strategy="ekfac", **kw):
    kw.setdefault("fisher", "empirical")
    return fit_factors(model, batches(x, y, 8), strategy, dtype=F64, **kw)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_registry_lists_strategies():
    names = available_strategies()
    assert set(names) >= {"ekfac", "kfac", "diagonal", "identity"}
    assert all(isinstance(d, str) and d for d in names.values())
    # One registry for every strategy (block strategies and the exact/lissa solvers).
    assert set(STRATEGIES) == set(names)
    with pytest.raises(InfluenceError, match="unknown strategy"):
        fit_factors(seeded(make_mlp), [], "nope")


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "identity"])
def test_preconditioner_matches_dense(mlp_setup, strategy):
    model, x, y = mlp_setup
    factors = fit(model, x, y, strategy)
    gen = torch.Generator().manual_seed(3)
    for name, layer in factors.layers.items():
        grads = torch.randn(4, layer.d_out, layer.d_in, generator=gen, dtype=F64)
        fast = precondition(layer, grads)
        dense = dense_preconditioner(layer)
        ref = (grads.reshape(4, -1) @ dense.T).reshape_as(grads)
        assert rel_err(fast, ref) < 1e-10, name
    if strategy == "identity":
        for layer in factors.layers.values():
            assert layer.damping == 1.0 and float(layer.eigenvalues.abs().max()) == 0.0


def test_ekfac_applied_equals_dense_solve(cnn_setup):
    model, x, y = cnn_setup
    factors = fit(model, x, y, "ekfac", damping=0.01)
    for name, layer in factors.layers.items():
        basis = torch.kron(layer.q_s, layer.q_a)
        curvature = basis @ torch.diag(layer.eigenvalues.reshape(-1) + layer.damping) @ basis.T
        grads = torch.randn(3, layer.d_out, layer.d_in, dtype=F64)
        ref = torch.linalg.solve(curvature, grads.reshape(3, -1).T).T.reshape_as(grads)
        assert rel_err(precondition(layer, grads), ref) < 1e-8, name


def captured_covariances(model, x, y):
    """S = mean_i Σ_p g gᵀ and A = mean_{i,p} a aᵀ, built here from the capture."""
    modules = select_modules(model)
    with eval_mode(model), ActivationCapture(modules) as cap:
        logits = cap.forward(model, x)
        layers = cap.gradients(F.cross_entropy(logits, y, reduction="sum"))
    out = {}
    for name, b in layers.items():
        a = to_weight_order(b.a, b.perm).reshape(-1, b.a.shape[2])
        g = b.g.reshape(-1, b.g.shape[2])
        out[name] = (g.T @ g / len(x), a.T @ a / a.shape[0])
    return out


@pytest.mark.parametrize("setup", ["mlp_setup", "cnn_setup"])
def test_kfac_is_inverse_of_kronecker_product(setup, request):
    model, x, y = request.getfixturevalue(setup)
    factors = fit(model, x, y, "kfac", damping=0.05)
    covs = captured_covariances(model, x, y)
    for name, layer in factors.layers.items():
        s, a = covs[name]
        assert s.abs().max() > 1e-8 and a.abs().max() > 1e-8
        eye = torch.eye(layer.d_out * layer.d_in, dtype=F64)
        ref = torch.linalg.inv(torch.kron(s, a) + 0.05 * eye)
        assert rel_err(dense_preconditioner(layer), ref) < 1e-8, name


@pytest.mark.parametrize("setup", ["mlp_setup", "cnn_setup"])
def test_diagonal_and_ekfac_eigenvalues_match_dense_fisher(setup, request):
    model, x, y = request.getfixturevalue(setup)
    diag = fit(model, x, y, "diagonal")
    ekfac = fit(model, x, y, "ekfac")
    per_example = per_example_gradients(model, list(diag.layers), x, y)
    for name, grads in per_example.items():
        fisher = dense_fisher(grads)
        d = diag.layers[name]
        assert rel_err(d.eigenvalues.reshape(-1), torch.diagonal(fisher)) < 1e-10, name
        e = ekfac.layers[name]
        basis = torch.kron(e.q_s, e.q_a)
        expected = torch.diagonal(basis.T @ fisher @ basis)
        assert rel_err(e.eigenvalues.reshape(-1), expected) < 1e-9, name


def test_auto_damping_is_tenth_of_mean_eigenvalue(mlp_setup):
    model, x, y = mlp_setup
    factors = fit(model, x, y, "ekfac")  # default scope: global, one λ for every layer
    pooled = torch.cat([layer.eigenvalues.reshape(-1) for layer in factors.layers.values()])
    for layer in factors.layers.values():
        assert layer.damping == pytest.approx(0.1 * float(pooled.mean()), rel=1e-12)
    per_layer = fit(model, x, y, "ekfac", damping_scope="layer", damping_factor=0.03)
    dampings = set()
    for layer in per_layer.layers.values():
        assert layer.damping == pytest.approx(0.03 * float(layer.eigenvalues.mean()), rel=1e-12)
        dampings.add(layer.damping)
    assert len(dampings) == len(per_layer.layers)  # really one λ per layer
    with pytest.raises(InfluenceError, match="damping_scope"):
        fit(model, x, y, "ekfac", damping_scope="model")
    fixed = fit(model, x, y, "diagonal", damping=0.25)
    assert all(layer.damping == 0.25 for layer in fixed.layers.values())
    with pytest.raises(InfluenceError, match="damping"):
        fit(model, x, y, "ekfac", damping=-1.0)


@pytest.mark.parametrize(
    "positions, d_in, d_out",
    [(16, 28, 4), (4, 4, 8), (4, 5, 8), (16, 4, 2), (1, 7, 5)],
)
def test_rotated_grads_flop_rule_matches_reference(positions, d_in, d_out):
    gen = torch.Generator().manual_seed(positions + d_in)
    a = torch.randn(6, positions, d_in, generator=gen, dtype=F64)
    g = torch.randn(6, positions, d_out, generator=gen, dtype=F64)
    q_a = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=F64))[0]
    q_s = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=F64))[0]
    for qa, qs in [(q_a, q_s), (None, q_s), (q_a, None), (None, None)]:
        fast = rotated_per_example_grads(a, g, qa, qs)
        ref = reference_rotated_grads(a, g, qa, qs)
        assert rel_err(fast, ref) < 1e-12


@pytest.mark.parametrize(
    "factory, shape", [(make_mlp, (6,)), (make_cnn, (2, 6, 6)), (make_branch_cnn, (3, 4, 4))]
)
@pytest.mark.parametrize("strategy", ["ekfac", "diagonal"])
def test_fast_eigenvalue_correction_matches_slow_path(factory, shape, strategy):
    model = seeded(factory)
    x, y = make_data(shape, 13)
    fast = fit_factors(model, batches(x, y, 5), strategy, dtype=F64, seed=4)
    slow = fit_factors(model, batches(x, y, 5), strategy, dtype=F64, seed=4, reference=True)
    for name in fast.layers:
        assert fast.layers[name].eigenvalues.abs().max() > 0
        assert rel_err(fast.layers[name].eigenvalues, slow.layers[name].eigenvalues) < 1e-6, name


def test_true_fisher_is_deterministic_under_seed(mlp_setup):
    model, x, y = mlp_setup
    runs = [fit_factors(model, batches(x, y, 8), "ekfac", dtype=F64, seed=s) for s in (7, 7, 8)]
    empirical = fit(model, x, y, "ekfac")
    for name in runs[0].layers:
        e0, e1, e2 = (r.layers[name].eigenvalues for r in runs)
        assert torch.equal(e0, e1)
        assert not torch.allclose(e0, e2)
        assert not torch.allclose(e0, empirical.layers[name].eigenvalues)
    assert runs[0].fisher == "true" and empirical.fisher == "empirical"


def test_true_fisher_samples_from_the_model(monkeypatch):
    """Sampled labels follow softmax(logits): a model that is certain gives its argmax."""
    model = seeded(make_mlp)
    with torch.no_grad():
        model[4].bias[:] = torch.tensor([0.0, 80.0, 0.0], dtype=F64)
    x, y = make_data((6,), 10)
    true = fit_factors(model, batches(x, y, 4), "diagonal", dtype=F64)
    ones = torch.ones_like(y)
    emp = fit_factors(model, batches(x, ones, 4), "diagonal", fisher="empirical", dtype=F64)
    for name in true.layers:
        torch.testing.assert_close(true.layers[name].eigenvalues, emp.layers[name].eigenvalues)


def test_progress_callback_stages(mlp_setup):
    model, x, y = mlp_setup
    seen = []
    fit_factors(model, batches(x, y, 8), "ekfac", on_batch=lambda s, n: seen.append((s, n)))
    assert seen == [("covariance", 8), ("covariance", 8), ("covariance", 6)] + [
        ("eigenvalues", 8), ("eigenvalues", 8), ("eigenvalues", 6)
    ]


def test_patterns_restrict_tracked_layers(mlp_setup):
    model, x, y = mlp_setup
    factors = fit(model, x, y, "kfac", modules=["4"])
    assert list(factors.layers) == ["4"]


def test_save_load_round_trip(tmp_path, mlp_setup):
    model, x, y = mlp_setup
    factors = fit(model, x, y, "ekfac")
    target = tmp_path / "factors" / "ekfac"
    factors.save(target, {"config_hash": "abc", "checkpoint_hash": "def"})
    assert sorted(os.listdir(target)) == ["factors.safetensors", "meta.json"]
    assert [p for p in os.listdir(target.parent) if p.startswith(".")] == []
    meta = Factors.read_meta(target)
    assert meta["strategy"] == "ekfac" and meta["config_hash"] == "abc"
    assert meta["num_examples"] == 22 and meta["fisher"] == "empirical"
    assert meta["damping_rule"] == "auto" and meta["package_version"]
    assert meta["modules"]["0"] == {
        "kind": "linear", "d_out": 5, "d_in": 7, "has_bias": True,
        "damping": factors.layers["0"].damping, "q_s": True, "q_a": True,
    }
    loaded = Factors.load(target)
    assert loaded.strategy == "ekfac" and loaded.num_examples == 22
    for name, layer in factors.layers.items():
        other = loaded.layers[name]
        assert other.damping == layer.damping and other.kind == layer.kind
        assert torch.equal(other.eigenvalues, layer.eigenvalues)
        assert torch.equal(other.q_s, layer.q_s) and torch.equal(other.q_a, layer.q_a)
    loaded.check_model(model)
    # Saving again replaces the directory atomically.
    fit(model, x, y, "diagonal").save(target)
    reloaded = Factors.load(target)
    assert reloaded.strategy == "diagonal" and reloaded.layers["0"].q_s is None
    assert [p for p in os.listdir(target.parent) if p.startswith(".")] == []
    with pytest.raises(ValueError):
        factors.save(target, {"strategy": "clash"})


def test_load_refuses_bad_directories(tmp_path, mlp_setup):
    model, x, y = mlp_setup
    target = tmp_path / "f"
    with pytest.raises(FactorsError, match="meta.json missing"):
        Factors.load(target)
    fit(model, x, y, "ekfac").save(target)
    data = (target / "factors.safetensors").read_bytes()
    (target / "factors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FactorsError, match="corrupt factors file") as info:
        Factors.load(target)
    assert "\n" not in str(info.value)
    (target / "factors.safetensors").unlink()
    with pytest.raises(FactorsError, match="factors.safetensors missing"):
        Factors.load(target)
    fit(model, x, y, "ekfac").save(target)
    (target / "meta.json").write_text("{not json")
    with pytest.raises(FactorsError, match="corrupt factors metadata"):
        Factors.load(target)
    fit(model, x, y, "ekfac").save(target)
    meta = json.loads((target / "meta.json").read_text())
    meta["modules"]["0"]["d_in"] = 99
    (target / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FactorsError, match="damaged or edited"):  # the content hash catches an edit
        Factors.load(target)
    meta[META_HASH] = meta_digest(meta)  # a consistent meta.json that disagrees with the tensors
    (target / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FactorsError, match="inconsistent"):
        Factors.load(target)


class _InterruptedWhileWritten(dict):
    """An extra_meta value whose serialisation is interrupted (Ctrl-C) half-way through
    writing meta.json, after factors.safetensors was written."""

    def items(self):
        raise KeyboardInterrupt


def test_interrupted_save_leaves_nothing_trusted(tmp_path, mlp_setup):
    model, x, y = mlp_setup
    factors = fit(model, x, y, "ekfac")
    with pytest.raises(KeyboardInterrupt):
        factors.save(tmp_path / "f", {"note": _InterruptedWhileWritten(a=1)})
    assert os.listdir(tmp_path) == []


def test_check_model_rejects_mismatch(mlp_setup, cnn_setup):
    model, x, y = mlp_setup
    factors = fit(model, x, y, "diagonal")
    with pytest.raises(FactorsError, match="does not have|do not match"):
        factors.check_model(cnn_setup[0])


def test_non_finite_covariance_names_layer(mlp_setup):
    model, x, y = mlp_setup
    x = x.clone()
    x[3, 0] = float("nan")
    with pytest.raises(InfluenceError, match="'0'"):
        fit(model, x, y, "ekfac")


def test_non_finite_gradients_raise_in_covariance(mlp_setup):
    model, x, y = mlp_setup
    # Finite activations whose outer products overflow float64 only in the covariance.
    x = x.clone()
    x[0, 0] = 1e200
    with pytest.raises(InfluenceError, match=r"non-finite .*layer '0'"):
        fit(model, x, y, "kfac")


def test_nothing_tracked_raises():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Softmax(-1))
    with pytest.raises(InfluenceError, match="nothing to track"):
        fit_factors(model, [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))])


def test_float32_fast_kernels_match_float64_reference():
    """The float32 path (oneDNN/MKL kernels, workspace buffers) against float64."""
    model64 = seeded(make_branch_cnn)
    model32 = seeded(make_branch_cnn).float()
    x, y = make_data((3, 4, 4), 40)
    f64 = fit_factors(model64, batches(x, y, 16), "ekfac", dtype=F64, seed=2)
    f32 = fit_factors(model32, batches(x.float(), y, 16), "ekfac", seed=2)
    for name, layer in f64.layers.items():
        other = f32.layers[name]
        assert other.eigenvalues.dtype == torch.float32
        # Compare basis-independent quantities: the dense preconditioners.
        assert rel_err(dense_preconditioner(other), dense_preconditioner(layer)) < 1e-3, name


@pytest.mark.parametrize("positions, d_in, d_out", [(16, 300, 4), (4, 260, 300), (1, 300, 270)])
def test_float32_rotation_kernels(positions, d_in, d_out):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(80, positions, d_in, generator=gen)
    g = torch.randn(80, positions, d_out, generator=gen)
    q_a = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=F64))[0]
    q_s = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=F64))[0]
    ref = reference_rotated_grads(a.double(), g.double(), q_a, q_s)
    fast = rotated_per_example_grads(a, g, q_a.float(), q_s.float())
    assert rel_err(fast.double(), ref) < 1e-4


def test_pass_cache_does_not_change_results(cnn_setup):
    model, x, y = cnn_setup
    cached = fit_factors(model, batches(x, y, 5), "ekfac", dtype=F64)
    uncached = fit_factors(model, batches(x, y, 5), "ekfac", dtype=F64, cache_bytes=0)
    tiny = fit_factors(model, batches(x, y, 5), "ekfac", dtype=F64, cache_bytes=10_000)
    for name in cached.layers:
        torch.testing.assert_close(cached.layers[name].eigenvalues, uncached.layers[name].eigenvalues)
        torch.testing.assert_close(tiny.layers[name].eigenvalues, uncached.layers[name].eigenvalues)


def test_loader_must_repeat_its_data(mlp_setup):
    model, x, y = mlp_setup

    class OneShot:
        def __init__(self):
            self.it = iter(batches(x, y, 8))

        def __iter__(self):
            return self.it

    with pytest.raises(InfluenceError, match="pass 1 but"):
        fit_factors(model, OneShot(), "ekfac", cache_bytes=0)
