"""value_i = Σ_t g_tᵀ P g_i against the column sums of the pairwise matrix, for every
registered strategy, and its memory against the number of query rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from influence_cli.engine import fit_factors, pairwise_scores, strategy_names
from influence_cli.engine.value import as_one_example, summed_query_gradients, value_scores
from influence_cli.engine.kernels import per_example_grads
from influence_cli.errors import InfluenceError
from engine_helpers import batches, make_branch_cnn, make_cnn, make_data, make_mlp, seeded

F64 = torch.float64
QUICK = {"lissa": {"depth": 20, "batch_size": 10_000}}
MODELS = {"mlp": (make_mlp, (6,), 22), "cnn": (make_cnn, (2, 6, 6), 14), "branch": (make_branch_cnn, (3, 4, 4), 12)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def setup(kind: str, strategy: str):
    make, shape, n = MODELS[kind]
    model = seeded(make)
    x, y = make_data(shape, n)
    qx, qy = make_data(shape, 9, seed=5)
    factors = fit_factors(model, batches(x, y, 6), strategy, dtype=F64, seed=1, options=QUICK.get(strategy))
    return model, x, y, qx, qy, factors


@pytest.mark.parametrize("strategy", strategy_names())
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("measurement", ["loss", "margin"])
def test_value_is_the_sum_of_the_pairwise_rows(kind, strategy, measurement):
    model, x, y, qx, qy, factors = setup(kind, strategy)
    loader = batches(x, y, 5)
    matrix = pairwise_scores(model, factors, loader, qx, qy, measurement=measurement)
    seen = []
    value = value_scores(model, factors, loader, qx, qy, measurement=measurement, query_batch_size=4,
                         on_batch=lambda s, n: seen.append((s, n)))
    assert value.shape == (len(x),)
    assert rel_err(value, matrix.sum(0)) < 1e-5
    mean = value_scores(model, factors, loader, qx, qy, measurement=measurement, reduce="mean")
    assert rel_err(mean, matrix.mean(0)) < 1e-5
    counts = {stage: sum(n for s, n in seen if s == stage) for stage in {s for s, _ in seen}}
    assert counts["query-gradients"] == len(qx) and counts["value"] == len(x)


@pytest.mark.parametrize("strategy", ["ekfac", "exact"])
def test_value_branch_cnn(strategy):
    """Every branch of the conv flop rule (positions vs d_in / d_out) sees the virtual example."""
    model, x, y, qx, qy, factors = setup("branch", strategy)
    loader = batches(x, y, 5)
    matrix = pairwise_scores(model, factors, loader, qx, qy)
    assert rel_err(value_scores(model, factors, loader, qx, qy), matrix.sum(0)) < 1e-5


def test_summed_query_gradients_feed_pairwise_scores():
    model, x, y, qx, qy, factors = setup("mlp", "ekfac")
    side = summed_query_gradients(model, factors, qx, qy)
    assert all(t.shape[0] == 1 for t in side.values())
    row = pairwise_scores(model, factors, batches(x, y, 5), qx, qy, test_gradients=side)
    assert rel_err(row[0], pairwise_scores(model, factors, batches(x, y, 5), qx, qy).sum(0)) < 1e-10


@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (1, 4), (4, 1)])
def test_one_virtual_example_has_the_summed_gradient(shape):
    grad = torch.randn(shape, dtype=F64)
    batch = as_one_example(grad)
    assert batch.n == 1 and batch.positions == min(shape)
    assert torch.allclose(per_example_grads(batch.a, batch.g)[0], grad)


def test_value_refuses_bad_arguments():
    model, x, y, qx, qy, factors = setup("mlp", "identity")
    with pytest.raises(InfluenceError, match="reduce"):
        value_scores(model, factors, batches(x, y, 5), qx, qy, reduce="max")
    with pytest.raises(InfluenceError, match="measurement"):
        value_scores(model, factors, batches(x, y, 5), qx, qy, measurement="accuracy")
    with pytest.raises(InfluenceError, match="no query rows"):
        value_scores(model, factors, batches(x, y, 5), qx[:0], qy[:0])


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    from pathlib import Path
    import torch
    from torch import nn
    from influence_cli.engine import fit_factors, pairwise_scores
    from influence_cli.engine.value import value_scores
    torch.manual_seed(0)
    torch.set_num_threads(1)
    path, rows = sys.argv[1], int(sys.argv[2])
    model = nn.Sequential(nn.Linear(400, 100), nn.Tanh(), nn.Linear(100, 3))
    x, y = torch.randn(64, 400), torch.randint(0, 3, (64,))
    loader = [(x[i:i + 32], y[i:i + 32], None) for i in range(0, 64, 32)]
    factors = fit_factors(model, loader, "ekfac")
    qx, qy = torch.randn(rows, 400), torch.randint(0, 3, (rows,))
    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    if path == "value":
        value_scores(model, factors, loader, qx, qy, query_batch_size=10)
    else:
        pairwise_scores(model, factors, loader, qx, qy, test_batch_size=10)
    after = status("VmHWM")
    print(json.dumps({"kib": after - before}))
    """
)


def _peak_growth_kib(path: str, rows: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, path, str(rows)], env=env, capture_output=True,
                         text=True, check=True, timeout=300)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["kib"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_value_memory_does_not_grow_with_the_query_rows():
    """Peak RSS growth (VmHWM after a reset, minus the RSS before) while scoring, 10 vs 1,000 query rows (one preconditioned row is
    40,403 floats: 1,000 rows of them are 160 MB). The pairwise path on the same rows is
    the control: it keeps every row's preconditioned gradient, so the measurement sees it."""
    value_small, value_big = _peak_growth_kib("value", 10), _peak_growth_kib("value", 1000)
    pair_small, pair_big = _peak_growth_kib("pairwise", 10), _peak_growth_kib("pairwise", 1000)
    assert pair_big - pair_small > 100_000, (pair_small, pair_big)  # the control sees ≥ 100 MB
    assert value_big - value_small < 20_000, (value_small, value_big)  # value: < 20 MB more
