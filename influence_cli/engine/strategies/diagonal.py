"""diagonal: the diagonal of the Fisher, E_i[G_i²] per weight (one data pass, no bases)."""

from __future__ import annotations

from typing import Any

from influence_cli.engine.strategy import BlockStrategy

__all__ = ["Diagonal"]


class Diagonal(BlockStrategy):
    name = "diagonal"
    description = "diagonal of the Fisher (per-weight variances)"
    passes = ("eigenvalues",)

    def fit_layers(self, ctx: Any) -> tuple[dict[str, tuple[Any, Any, Any]], int]:
        from influence_cli.engine.passes import fit_eigenvalues

        lam, total = fit_eigenvalues(ctx, {name: (None, None) for name in ctx.modules})
        return {name: (None, None, value) for name, value in lam.items()}, total

    def from_sums(self, ctx: Any, sums: Any) -> tuple[dict[str, tuple[Any, Any, Any]], int]:
        lam, total = sums.eigenvalues
        return {name: (None, None, lam[name] / total) for name in ctx.modules}, total
