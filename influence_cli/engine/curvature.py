"""Curvature of the mean training loss (cross-entropy, or squared error: engine/losses.py) w.r.t. the tracked parameters (untracked
ones held fixed, model in eval mode), for the strategies over the flat parameter vector:

- ``gauss_newton``: GN = (1/N) Σ_i J_iᵀ H_out,i J_i, H_out = diag(p) − ppᵀ (PSD; I for squared error).
- ``hessian``: the exact Hessian (may be indefinite away from a minimum).

Pseudo-gradients (GN = Σ_rows x xᵀ through the ordinary capture), curvature-vector
products for many vectors at once (torch.func), the trace and the top eigenvalue.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from influence_cli.engine.batching import iterate_batches
from influence_cli.engine.capture import ActivationCapture, LayerBatch, logits_of
from influence_cli.engine.flat import ParameterLayout
from influence_cli.engine.losses import output_hessian_product, output_hessian_root, task_loss
from influence_cli.engine.options import CURVATURES
from influence_cli.errors import InfluenceError

__all__ = [
    "CURVATURES",
    "check_curvature",
    "CurvatureProducts",
    "pseudo_gradient_batches",
    "trace_estimate",
    "top_eigenvalue",
    "ROW_ELEMENTS",
]

# Elements of one (rows, P) block of pseudo-gradients / hvp outputs built in one go.
ROW_ELEMENTS = 16 * 1024 * 1024
_POWER_ITERATIONS = 50
_HUTCHINSON_PROBES = 32


def check_curvature(curvature: str) -> str:
    if curvature not in CURVATURES:
        raise InfluenceError(f"curvature must be one of {CURVATURES}, not {curvature!r}")
    return curvature


def pseudo_gradient_batches(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[tuple[Tensor, Tensor]],
    dtype: torch.dtype = torch.float64,
) -> Iterator[tuple[int, int, dict[str, LayerBatch]]]:
    """(n, C, {layer: LayerBatch of n·C rows}) per batch: GN = (1/N) Σ_rows x xᵀ.

    H_out = diag(p) − ppᵀ = M Mᵀ with M = diag(√p) − p√pᵀ (Σp = 1), so
    J_iᵀ H_out J_i = Σ_c (J_iᵀ m_c)(J_iᵀ m_c)ᵀ. The batch is replicated C times
    (row c·n + i = example i, column c) and one backward pass of Σ_rows z·m gives
    every pseudo-gradient through the ordinary capture machinery. Model must be in
    eval mode (replicas must see identical forward passes).
    """
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        return
    with torch.no_grad():
        classes = int(logits_of(model(first[0][:1])).shape[-1])
    capture = ActivationCapture(modules, dtype=dtype)
    with torch.no_grad(), capture:
        for inputs, labels in itertools.chain([first], iterator):
            n = int(inputs.shape[0])
            rep = inputs.unsqueeze(0).expand(classes, *inputs.shape).reshape(classes * n, *inputs.shape[1:])
            logits = capture.forward(model, rep)
            with torch.enable_grad():
                m = output_hessian_root(logits[:n], labels)  # (C, n, C) indexed [c, i, k]
                cot = m.reshape(classes * n, classes).to(logits.dtype)
                loss = (logits * cot).sum()
                layers = capture.gradients(loss)
            yield n, classes, layers


class CurvatureProducts:
    """K·V on one minibatch for a batch of flat vectors V (k, P), via torch.func.

    Returns the SUM over the minibatch's examples (callers divide by the count), so
    products over several batches add up to the full-data curvature.
    """

    def __init__(self, model: nn.Module, layout: ParameterLayout, curvature: str = "gauss_newton"):
        self.model = model
        self.layout = layout
        self.curvature = check_curvature(curvature)
        tracked = set(layout.param_names)
        self.fixed = {k: v.detach() for k, v in model.named_parameters() if k not in tracked}
        self.fixed.update(dict(model.named_buffers()))
        self.tracked = layout.current()

    def _logits(self, params: dict[str, Tensor], inputs: Tensor) -> Tensor:
        return logits_of(functional_call(self.model, {**self.fixed, **params}, (inputs,)))

    def product(self, inputs: Tensor, labels: Tensor, vectors: Tensor) -> Tensor:
        """Σ_i K_i V for the examples of one batch; vectors (k, P) → (k, P)."""
        with warnings.catch_warnings():
            # torch's forward-AD decompositions call torch.jit.script on first use, which
            # warns about its own deprecation; not the user's concern.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            return self._product(inputs, labels, vectors)

    def _product(self, inputs: Tensor, labels: Tensor, vectors: Tensor) -> Tensor:
        dtype = next(iter(self.tracked.values())).dtype
        tangents = self.layout.to_params(vectors.to(dtype))
        if self.curvature == "gauss_newton":

            def f(params: dict[str, Tensor]) -> Tensor:
                return self._logits(params, inputs)

            logits, vjp_fn = vjp(f, self.tracked)

            def jv(t: dict[str, Tensor]) -> Tensor:
                return jvp(f, (self.tracked,), (t,))[1]

            u = vmap(jv)(tangents)  # (k, n, C)
            hu = output_hessian_product(logits, labels, u)
            out = vmap(vjp_fn)(hu)[0]
        else:

            def loss(params: dict[str, Tensor]) -> Tensor:
                return task_loss(self._logits(params, inputs), labels)

            g = grad(loss)

            def hv(t: dict[str, Tensor]) -> Tensor:
                return jvp(g, (self.tracked,), (t,))[1]

            out = vmap(hv)(tangents)
        return self.layout.from_params(out).to(vectors.dtype)


def trace_estimate(model, layout, loader, dev, curvature, seed, on_batch) -> tuple[float, int]:
    """trace(K) (mean over the data) and N: exact for GN (Σ of squared pseudo-gradient
    norms, no P² memory), Hutchinson with Rademacher probes for the Hessian."""
    total = 0
    trace = 0.0
    if curvature == "gauss_newton":
        for n, classes, layers in pseudo_gradient_batches(model, layout.modules, iterate_batches(loader, dev)):
            for batch in layers.values():
                if batch.positions == 1:
                    trace += float((batch.a[:, 0].square().sum(1) * batch.g[:, 0].square().sum(1)).sum())
                else:
                    step = max(1, ROW_ELEMENTS // (batch.a.shape[2] * batch.g.shape[2]))
                    for s in range(0, batch.n, step):
                        grads = torch.bmm(batch.g[s : s + step].transpose(1, 2), batch.a[s : s + step])
                        trace += float(grads.square().sum())
            total += n
            if on_batch is not None:
                on_batch("trace", n)
        return trace / max(total, 1), total
    products = CurvatureProducts(model, layout, curvature)
    dtype = next(iter(products.tracked.values())).dtype
    gen = torch.Generator().manual_seed(int(seed))
    probes = (torch.randint(0, 2, (_HUTCHINSON_PROBES, layout.size), generator=gen) * 2 - 1).to(dev, dtype)
    for x, y in iterate_batches(loader, dev):
        trace += float((products.product(x, y, probes) * probes).sum()) / _HUTCHINSON_PROBES
        total += int(y.shape[0])
        if on_batch is not None:
            on_batch("trace", int(y.shape[0]))
    return trace / max(total, 1), total


def top_eigenvalue(model, layout, loader, dev, curvature, seed, on_batch) -> float:
    """|λ|_max of the full-data curvature by power iteration (one data pass per step)."""
    products = CurvatureProducts(model, layout, curvature)
    dtype = next(iter(products.tracked.values())).dtype
    gen = torch.Generator().manual_seed(int(seed) + 12345)
    v = torch.randn(1, layout.size, generator=gen, dtype=torch.float64).to(dev, dtype)
    v /= v.norm()
    value = 0.0
    for _ in range(_POWER_ITERATIONS):
        w = torch.zeros_like(v)
        count = 0
        for x, y in iterate_batches(loader, dev):
            w += products.product(x, y, v)
            count += int(y.shape[0])
        w /= max(count, 1)
        new = float(w.norm())
        if new == 0.0 or not math.isfinite(new):
            return new
        v = w / new
        if on_batch is not None:
            on_batch("power-iteration", 1)
        if abs(new - value) <= 1e-5 * new:
            return new
        value = new
    return value
