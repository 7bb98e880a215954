"""Fitting a block strategy: context, the strategy's passes, damping, storage dtype.

``fit_blocks`` is what ``BlockStrategy.fit`` runs. The job-array side (``--shard i/n``
jobs have no process group: each writes its un-normalised sums, a merge adds them) is
``covariance_sums`` / ``eigenvalue_sums`` per shard and ``factors_from_merged`` once the
sums are merged; the strategy's ``passes`` say which rounds it needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from influence_cli.engine.batching import ProgressCallback
from influence_cli.engine.damping import check_damping, damping_value
from influence_cli.engine.eigen import bases_from_covariances
from influence_cli.engine.factors import Factors
from influence_cli.engine.fitting import FitContext, make_context
from influence_cli.engine.passes import CovarianceSums, covariance_pass, eigenvalue_pass
from influence_cli.engine.operators import LayerFactors
from influence_cli.engine.tracked import select_modules
from influence_cli.errors import InfluenceError

__all__ = [
    "fit_blocks",
    "finalise",
    "build_layers",
    "MergedSums",
    "factors_from_merged",
    "covariance_sums",
    "eigenvalue_sums",
]

Parts = dict[str, tuple[Tensor | None, Tensor | None, Tensor]]


def fit_blocks(strategy: Any, request: Any) -> Factors:
    """Fit a BlockStrategy instance as ``request`` (a FitRequest) asks."""
    if strategy.fixed_damping is None:
        check_damping(request.damping, request.damping_factor)  # before any data pass
    if request.damping_scope not in ("layer", "global"):
        raise InfluenceError(f"damping_scope must be 'layer' or 'global', not {request.damping_scope!r}")
    ctx = make_context(
        request.model, request.loader, request.fisher, request.modules, request.device, request.seed,
        request.on_batch, request.amp, request.reference, request.cache_bytes, request.dist,
    )
    parts, total = strategy.fit_layers(ctx)
    return finalise(strategy, build_layers(ctx, parts), total, request.damping, request.fisher, request.dtype,
                    request.damping_factor, request.damping_scope)


def build_layers(ctx: FitContext, parts: Parts) -> dict[str, LayerFactors]:
    """LayerFactors (damping unset) from {layer: (Q_S, Q_A, Λ)}; refuses missing layers
    and non-finite eigenvalues."""
    layers = {}
    for name in ctx.modules:
        if name not in parts:
            raise InfluenceError(f"tracked module {name!r} received no data while fitting")
        q_s, q_a, lam = parts[name]
        kind, d_out, d_in, has_bias = ctx.layer_info(name)
        if not bool(torch.isfinite(lam).all()):
            raise InfluenceError(f"non-finite eigenvalues in layer {name!r}")
        layers[name] = LayerFactors(
            name=name,
            kind=kind,
            d_out=d_out,
            d_in=d_in,
            has_bias=has_bias,
            q_s=q_s,
            q_a=q_a,
            eigenvalues=lam.to(torch.float64),
            damping=math.nan,
        )
    return layers


def finalise(
    strategy: Any,
    layers: dict[str, LayerFactors],
    total: int,
    damping: str | float,
    fisher: str,
    dtype: torch.dtype,
    damping_factor: float | None = None,
    damping_scope: str = "global",
) -> Factors:
    """Damping per layer and the storage dtype: the last step of every fit."""
    if damping_factor is None:
        damping_factor = strategy.default_damping_factor
    fixed = strategy.fixed_damping
    pooled = None
    if damping_scope == "global" and layers:
        pooled = torch.cat([layer.eigenvalues.reshape(-1).to(torch.float64) for layer in layers.values()])
    for layer in layers.values():
        if fixed is not None:
            layer.damping = float(fixed)
        else:
            source = layer.eigenvalues if pooled is None else pooled
            layer.damping = damping_value(damping, source, damping_factor)
        layer.eigenvalues = layer.eigenvalues.to(dtype)
        if layer.q_s is not None:
            layer.q_s = layer.q_s.to(dtype)
        if layer.q_a is not None:
            layer.q_a = layer.q_a.to(dtype)
    return Factors(
        strategy=strategy.name,
        damping_rule=damping if fixed is None else "none",
        fisher=fisher,
        num_examples=total,
        layers=layers,
    )


# ------------------------------------------------------- sharded fitting (job arrays)
@dataclass
class MergedSums:
    """What the shards of a block strategy hold once merged (None where not needed).

    covariance: pass-1 sums; bases: {layer: (λ_S, Q_S, λ_A, Q_A)} from them;
    eigenvalues: ({layer: Σ_i (Q_Sᵀ G_i Q_A)²}, examples); num_examples: the data size.
    """

    covariance: CovarianceSums | None = None
    bases: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] | None = None
    eigenvalues: tuple[dict[str, Tensor], int] | None = None
    num_examples: int | None = None


def covariance_sums(
    model: nn.Module, loader: Iterable, *, fisher: str = "true", modules: Any = None, device: Any = None,
    seed: int = 0, on_batch: ProgressCallback | None = None, amp: str | None = None,
) -> CovarianceSums:
    """Pass 1 on this loader only, un-normalised (a shard's contribution)."""
    ctx = make_context(model, loader, fisher, modules, device, seed, on_batch, amp)
    return covariance_pass(ctx, 0)[0]


def eigenvalue_sums(
    model: nn.Module, loader: Iterable, bases: dict[str, tuple[Tensor | None, Tensor | None]], *,
    fisher: str = "true", modules: Any = None, device: Any = None, seed: int = 0,
    on_batch: ProgressCallback | None = None, amp: str | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Pass 2 on this loader only, un-normalised: ({layer: Σ_i (Q_Sᵀ G_i Q_A)²}, examples).
    ``bases`` = {layer: (Q_S, Q_A)} (None = identity, the diagonal strategy)."""
    ctx = make_context(model, loader, fisher, modules, device, seed, on_batch, amp)
    return eigenvalue_pass(ctx, bases)


def factors_from_merged(
    strategy: Any,
    model: nn.Module,
    sums: MergedSums,
    *,
    damping: str | float = "auto",
    fisher: str = "true",
    modules: Any = None,
    dtype: torch.dtype = torch.float32,
    damping_factor: float | None = None,
    damping_scope: str = "global",
) -> Factors:
    """The Factors a single fit of ``strategy`` (a BlockStrategy instance) would give,
    from merged shard sums. Bases are derived from merged covariances when needed."""
    tracked = modules if isinstance(modules, dict) else select_modules(model, modules)
    ctx = FitContext(model, [], tracked, torch.device("cpu"), fisher, 0, None)
    name = strategy.name
    if "covariance" in strategy.passes and sums.bases is None:
        if sums.covariance is None:
            raise InfluenceError(f"{name}: merged pass-1 covariances are needed")
        sums.bases = bases_from_covariances(sums.covariance)
    if "eigenvalues" in strategy.passes:
        if sums.eigenvalues is None:
            raise InfluenceError(f"{name}: merged pass-2 eigenvalue sums are needed")
        if sums.eigenvalues[1] <= 0:
            raise InfluenceError("the shards hold no examples")
    parts, total = strategy.from_sums(ctx, sums)
    return finalise(strategy, build_layers(ctx, parts), total, damping, fisher, dtype, damping_factor, damping_scope)
