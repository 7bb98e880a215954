"""The two data passes of the block strategies, as un-normalised sums.

Pass 1 accumulates A = E[a aᵀ] and S = E[g gᵀ] per layer (``covariance_pass``); pass 2
re-fits the eigenvalues in given bases, Λ_jk = E_i[(Q_Sᵀ G_i Q_A)_jk²]
(``eigenvalue_pass``), without building G_i for rank-one layers and rotating each side
of a conv gradient where it is cheaper. Sums of disjoint shards or ranks add up to the
sums of the whole set, so torchrun all-reduces them and ``--shard`` jobs merge them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from influence_cli.engine.batching import expected_examples
from influence_cli.engine.capture import LayerBatch
from influence_cli.engine.eigen import eigen_bases
from influence_cli.engine.fitting import BatchData, FitContext, captured_batches, reduce_sums, replay, world_size
from influence_cli.engine.kernels import (
    Workspace,
    accumulate_gram,
    accumulate_gram_positions,
    chunk_size,
    matmul_t,
    mirror_upper,
    reference_rotated_grads,
    rotated_per_example_grads,
)
from influence_cli.engine.tracked import to_internal_order, to_weight_order
from influence_cli.errors import InfluenceError

__all__ = [
    "CovarianceSums",
    "covariance_pass",
    "fit_covariances",
    "kronecker_bases",
    "eigenvalue_pass",
    "fit_eigenvalues",
]


def fit_covariances(
    ctx: FitContext, cache_bytes: int = 0
) -> tuple[dict[str, Tensor], dict[str, Tensor], int, list[BatchData] | None]:
    """Pass 1: A = E_{i,p}[a aᵀ], S = E_i[Σ_p g gᵀ] in float64.

    With ``cache_bytes`` > 0, also keeps copies of the captured (a, g) while they fit in
    that many bytes, so pass 2 can skip its forward/backward (the sampled Fisher labels
    are identical in both passes anyway). Returns the cache, or None if it overflowed.
    The sums are all-reduced over ranks (``ctx.dist``) before normalisation.
    """
    sums, cache = covariance_pass(ctx, cache_bytes)
    sums = sums.reduced(ctx.dist)
    if sums.examples == 0:
        raise InfluenceError("the data loader yielded no examples")
    cov_a, cov_s = sums.normalised()
    return cov_a, cov_s, sums.examples, cache


def covariance_pass(ctx: FitContext, cache_bytes: int = 0) -> tuple[CovarianceSums, list[BatchData] | None]:
    """Pass-1 accumulators of this process's loader (not reduced), plus the pass cache."""
    cache: list[BatchData] | None = [] if cache_bytes > 0 else None
    cached = 0
    acc_a: dict[str, Tensor] = {}
    acc_s: dict[str, Tensor] = {}
    positions: dict[str, int] = {}
    perms: dict[str, Tensor | None] = {}
    total = 0
    ws = Workspace()
    capture_ws = Workspace()
    for n, layers in captured_batches(ctx, "covariance", capture_ws):
        total += n
        for name, batch in layers.items():
            d_in, d_out = batch.a.shape[2], batch.g.shape[2]
            a2 = batch.a.reshape(-1, d_in)
            if name not in acc_a:
                acc_a[name] = torch.zeros(d_in, d_in, dtype=a2.dtype, device=a2.device)
                acc_s[name] = torch.zeros(d_out, d_out, dtype=a2.dtype, device=a2.device)
                positions[name] = 0
                perms[name] = batch.perm
            accumulate_gram(acc_a[name], a2)
            accumulate_gram_positions(acc_s[name], batch.g, ws)
            positions[name] += batch.real_positions
        if cache is not None:
            size = sum(
                (b.a.numel() + b.g.numel()) * b.a.element_size() for b in layers.values()
            )
            cached += size
            if not cache:  # first batch: give up at once if the whole set cannot fit
                expected = expected_examples(ctx.loader, n)
                if expected is not None and size * expected / n > cache_bytes:
                    cached = cache_bytes + 1
            if cached > cache_bytes:
                cache = None
                capture_ws.enabled = True
            elif capture_ws.enabled:  # first batch: its tensors live in the workspace
                cache.append(
                    (n, {k: LayerBatch(b.a.clone(), b.g.clone(), b.perm, b.count) for k, b in layers.items()})
                )
                capture_ws.enabled = False  # later batches are fresh tensors: keep them
            else:
                cache.append((n, layers))
    if total == 0 and world_size(ctx.dist) <= 1:
        raise InfluenceError("the data loader yielded no examples")
    return CovarianceSums(
        {name: to_weight_order(to_weight_order(mirror_upper(acc).to(torch.float64), perms[name], 0), perms[name], 1)
         for name, acc in acc_a.items()},
        {name: mirror_upper(acc).to(torch.float64) for name, acc in acc_s.items()},
        dict(positions),
        total,
    ), cache


@dataclass
class CovarianceSums:
    """Pass-1 accumulators before normalisation, weight column order, float64:
    Σ_{i,p} a aᵀ and Σ_i Σ_p g gᵀ per layer, positions seen per layer, examples seen.
    Sums of disjoint shards add up to the sums of the whole set."""

    a: dict[str, Tensor]
    s: dict[str, Tensor]
    positions: dict[str, int]
    examples: int

    def reduced(self, dist: Any) -> "CovarianceSums":
        if world_size(dist) <= 1:
            return self
        tensors = {**{f"{k}::A": v for k, v in self.a.items()}, **{f"{k}::S": v for k, v in self.s.items()}}
        counts = {**{f"{k}::positions": v for k, v in self.positions.items()}, "examples": self.examples}
        tensors, counts = reduce_sums(dist, tensors, counts)
        names = list(self.a)
        return CovarianceSums(
            {k: tensors[f"{k}::A"] for k in names},
            {k: tensors[f"{k}::S"] for k in names},
            {k: counts[f"{k}::positions"] for k in names},
            counts["examples"],
        )

    def __add__(self, other: "CovarianceSums") -> "CovarianceSums":
        if set(self.a) != set(other.a):
            raise InfluenceError("covariance sums of different layer sets cannot be added")
        return CovarianceSums(
            {k: self.a[k] + other.a[k] for k in self.a},
            {k: self.s[k] + other.s[k] for k in self.s},
            {k: self.positions[k] + other.positions[k] for k in self.positions},
            self.examples + other.examples,
        )

    def normalised(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        cov_a = {k: v / self.positions[k] for k, v in self.a.items()}
        cov_s = {k: v / self.examples for k, v in self.s.items()}
        return cov_a, cov_s

    def tensors(self) -> dict[str, Tensor]:
        return {**{f"{k}::A": v for k, v in self.a.items()}, **{f"{k}::S": v for k, v in self.s.items()}}

    def counts(self) -> dict[str, int]:
        return {**{f"{k}::positions": v for k, v in self.positions.items()}, "examples": self.examples}

    @classmethod
    def from_parts(cls, tensors: dict[str, Tensor], counts: dict[str, int]) -> "CovarianceSums":
        names = sorted(k[: -len("::A")] for k in tensors if k.endswith("::A"))
        return cls(
            {k: tensors[f"{k}::A"].to(torch.float64) for k in names},
            {k: tensors[f"{k}::S"].to(torch.float64) for k in names},
            {k: int(counts[f"{k}::positions"]) for k in names},
            int(counts["examples"]),
        )


def kronecker_bases(
    ctx: FitContext, cache_bytes: int = 0
) -> tuple[dict[str, tuple[Tensor, Tensor, Tensor, Tensor]], int, list[BatchData] | None]:
    """Pass 1 + eigendecomposition: {layer: (λ_S, Q_S, λ_A, Q_A)}, example count, cache."""
    cov_a, cov_s, total, cache = fit_covariances(ctx, cache_bytes)
    return eigen_bases(cov_a, cov_s, ctx.dist), total, cache


def fit_eigenvalues(
    ctx: FitContext,
    bases: dict[str, tuple[Tensor | None, Tensor | None]],
    cache: list[BatchData] | None = None,
    expected: int | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Pass 2: Λ_jk = (1/N) Σ_i (Q_Sᵀ G_i Q_A)_jk² per layer, bases given as (Q_S, Q_A).

    The sums are all-reduced over ranks (``ctx.dist``) before normalisation.
    """
    sums, total = eigenvalue_pass(ctx, bases, cache)
    sums, counts = reduce_sums(ctx.dist, sums, {"examples": total})
    total = counts["examples"]
    if expected is not None and total != expected:
        raise InfluenceError(
            f"the data loader yielded {expected} examples in pass 1 but {total} in pass 2; "
            "it must iterate the same data each time (a re-iterable loader, not an iterator)"
        )
    if total == 0:
        raise InfluenceError("the data loader yielded no examples")
    return {name: value / total for name, value in sums.items()}, total


def eigenvalue_pass(
    ctx: FitContext,
    bases: dict[str, tuple[Tensor | None, Tensor | None]],
    cache: list[BatchData] | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Pass-2 accumulators Σ_i (Q_Sᵀ G_i Q_A)², float64, weight order; local (not reduced).

    Rank-one layers (P == 1): Λ += (g̃∘g̃)ᵀ (ã∘ã), one matmul per batch, no G_i. Others:
    rotated per-example gradients with the per-side flop rule, in memory-bounded chunks.
    """
    acc: dict[str, Tensor] = {}
    ops: dict[str, tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]] = {}
    perms: dict[str, Tensor | None] = {}
    total = 0
    ws = Workspace()
    source = captured_batches(ctx, "eigenvalues") if cache is None else replay(ctx, cache, "eigenvalues")
    for n, layers in source:
        total += n
        for name, batch in layers.items():
            a, g = batch.a, batch.g
            d_in, d_out = a.shape[2], g.shape[2]
            if name not in ops:
                q_s, q_a = bases[name]
                perms[name] = batch.perm
                if q_a is not None:  # rows of Q_A follow the captured column order
                    q_a = to_internal_order(q_a.to(a.device), batch.perm, 0)
                q_s = None if q_s is None else q_s.to(device=a.device, dtype=a.dtype)
                q_a = None if q_a is None else q_a.to(dtype=a.dtype)
                ops[name] = (
                    q_s,
                    q_a,
                    None if q_s is None else q_s.T.contiguous(),
                    None if q_a is None else q_a.T.contiguous(),
                )
                acc[name] = torch.zeros(d_out, d_in, dtype=a.dtype, device=a.device)
            q_s, q_a, q_s_t, q_a_t = ops[name]
            if batch.positions == 1 and not ctx.reference:
                # Transposed layout (d, n) so all three products are x @ wᵀ GEMMs:
                # ãᵀ = Q_Aᵀ aᵀ, g̃ᵀ = Q_Sᵀ gᵀ, then Λ += (g̃∘g̃)ᵀ (ã∘ã).
                a_sq = a[:, 0].T.square() if q_a is None else matmul_t(q_a_t, a[:, 0]).square_()
                g_sq = g[:, 0].T.square() if q_s is None else matmul_t(q_s_t, g[:, 0]).square_()
                acc[name].add_(matmul_t(g_sq.contiguous(), a_sq.contiguous()))
            else:
                step = chunk_size(d_out * d_in * 2)
                for start in range(0, n, step):
                    sl = slice(start, start + step)
                    if ctx.reference:
                        rotated = reference_rotated_grads(a[sl], g[sl], q_a, q_s)
                    else:
                        rotated = rotated_per_example_grads(a[sl], g[sl], q_a, q_s, ws, q_a_t)
                    summed = torch.sum(rotated.square_(), 0, out=ws.get("lam_sum", (d_out, d_in), a))
                    acc[name].add_(summed)
    # With an identity A basis the columns of Λ are weight columns: back to weight order.
    sums = {
        name: value.to(torch.float64) if bases[name][1] is not None else to_weight_order(value.to(torch.float64), perms[name], 1)
        for name, value in acc.items()
    }
    return sums, total
