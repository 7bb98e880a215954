"""Slow, obviously-correct references for tests: torch.func per-example gradients,
dense Fisher blocks and dense scores. Independent of the hook machinery on purpose.

Only for tiny models: the dense matrices are (d_out·d_in)² per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from influence_cli.engine.factors import Factors, dense_preconditioner
from influence_cli.engine.tracked import eval_mode
from influence_cli.engine.scoring import measurement_loss

__all__ = [
    "per_example_gradients",
    "dense_fisher",
    "dense_self_influence",
    "dense_pairwise_scores",
]


def per_example_gradients(
    model: nn.Module,
    module_names: list[str],
    inputs: Tensor,
    labels: Tensor,
    measurement: str = "loss",
) -> dict[str, Tensor]:
    """{layer: (N, d_out, d_in)} weight gradients per example, bias as the last column."""
    named = dict(model.named_modules())
    params = {k: v.detach() for k, v in model.named_parameters()}
    tracked = {}
    for name in module_names:
        prefix = f"{name}." if name else ""
        tracked[prefix + "weight"] = params[prefix + "weight"]
        if getattr(named[name], "bias", None) is not None:
            tracked[prefix + "bias"] = params[prefix + "bias"]

    def loss_fn(tp: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**params, **tp}, (x.unsqueeze(0),))
        return measurement_loss(out, y.unsqueeze(0), measurement)

    with eval_mode(model):
        grads = vmap(grad(loss_fn), in_dims=(None, 0, 0))(tracked, inputs, labels)
    result = {}
    for name in module_names:
        prefix = f"{name}." if name else ""
        w = grads[prefix + "weight"]
        n, d_out = w.shape[0], w.shape[1]
        parts = [w.reshape(n, d_out, -1)]
        if prefix + "bias" in grads:
            parts.append(grads[prefix + "bias"].reshape(n, d_out, 1))
        result[name] = torch.cat(parts, dim=2)
    return result


def dense_fisher(per_example: Tensor) -> Tensor:
    """F = mean_i vec(G_i) vec(G_i)ᵀ (row-major vec) of one layer's (N, d_out, d_in)."""
    flat = per_example.reshape(per_example.shape[0], -1).double()
    return flat.T @ flat / flat.shape[0]


def dense_self_influence(factors: Factors, per_example: dict[str, Tensor]) -> Tensor:
    """Σ_layers vec(G_i)ᵀ P_dense vec(G_i) → (N,)."""
    total = None
    for name, grads in per_example.items():
        flat = grads.reshape(grads.shape[0], -1).double()
        dense = dense_preconditioner(factors.layers[name])
        part = ((flat @ dense) * flat).sum(1)
        total = part if total is None else total + part
    return total


def dense_pairwise_scores(
    factors: Factors, test_grads: dict[str, Tensor], train_grads: dict[str, Tensor]
) -> Tensor:
    """Σ_layers vec(G_t)ᵀ P_dense vec(G_i) → (T, N)."""
    total = None
    for name, tg in test_grads.items():
        t_flat = tg.reshape(tg.shape[0], -1).double()
        i_flat = train_grads[name].reshape(train_grads[name].shape[0], -1).double()
        part = t_flat @ dense_preconditioner(factors.layers[name]) @ i_flat.T
        total = part if total is None else total + part
    return total
