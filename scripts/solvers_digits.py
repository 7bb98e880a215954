"""Measure the exact and LiSSA strategies on a digits-sized MLP (64→128→10, ~1,400 examples).

    cd /work/wt-solvers && python scripts/solvers_digits.py
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from influence_cli.engine import (
    CurvatureProducts,
    ParameterLayout,
    fit_exact,
    fit_lissa,
    flat_gradients,
    gradient_batches,
    self_influence,
)
from influence_cli.data.dataset import ExampleSet
from influence_cli.loaders import BatchLoader


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x, y = x[:1400], y[:1400]
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    acc = float((model(x).argmax(1) == y).float().mean())
    loader = BatchLoader(ExampleSet(x, y, [str(i) for i in range(len(y))]), 256)
    print(f"train accuracy {acc:.3f}")

    t = time.perf_counter()
    exact = fit_exact(model, loader)
    fit_s = time.perf_counter() - t
    print(f"exact fit: P={exact.num_params}, {fit_s:.1f} s, damping {exact.damping:.4g}, {exact.factorization}")
    t = time.perf_counter()
    s = self_influence(model, exact, loader)
    print(f"exact self-influence of {len(s)} examples: {time.perf_counter() - t:.2f} s")
    exact64 = fit_exact(model, loader, dtype=torch.float64)
    s64 = self_influence(model, exact64, loader)
    print(f"float32 factor vs float64 factor self-influence rel err {float((s - s64).norm() / s64.norm()):.2e}")

    # Minibatch vs full-data top eigenvalue (justifies LISSA_SCALE_MARGIN).
    layout = ParameterLayout(exact.check_model(model))
    products = CurvatureProducts(model, layout, "gauss_newton")
    lissa = fit_lissa(model, loader, depth=1, batch_size=64)
    ratios = []
    g = torch.Generator().manual_seed(0)
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 20):
        idx = torch.randperm(len(y), generator=g)[:64]
        v = torch.randn(1, layout.size)
        for _ in range(30):
            w = products.product(x[idx], y[idx], v) / 64
            lam = float(w.norm())
            v = w / lam
        ratios.append(lam / lissa.lambda_max)
    print(f"lambda_max full {lissa.lambda_max:.4g}; minibatch(64)/full: max {max(ratios):.2f}, "
          f"mean {sum(ratios) / len(ratios):.2f}; scale {lissa.scale:.4g}, damping {lissa.damping:.4g}")

    gen = torch.Generator().manual_seed(1)
    idx = torch.randperm(len(y), generator=gen)[:8]
    (_, layers), = list(gradient_batches(model, layout.modules, [(x[idx], y[idx])]))
    v = flat_gradients(layout, layers, torch.float32)
    ref = exact64.precondition_flat(v.double()).float()
    for depth in (100, 300, 1000, 3000):
        for bs in (64, 1400):
            solver = fit_lissa(model, loader, depth=depth, batch_size=bs)
            t = time.perf_counter()
            est = solver.precondition_flat(v)
            secs = time.perf_counter() - t
            err = float(((est - ref).norm(dim=1) / ref.norm(dim=1)).mean())
            print(f"lissa depth {depth:5d} batch {bs:4d}: mean rel err vs exact {err:.3f} "
                  f"({secs:.1f} s for {len(v)} vectors; last rel change {solver.last_report['final_relative_change']:.2e})")


if __name__ == "__main__":
    main()
