"""identity: no curvature, P = I, so scores are plain gradient inner products g_tᵀ g_i."""

from __future__ import annotations

from typing import Any

from influence_cli.engine.strategy import BlockStrategy

__all__ = ["Identity"]


class Identity(BlockStrategy):
    name = "identity"
    description = "no curvature: plain gradient inner products (damping has no effect)"
    passes = ()  # only the example count
    fixed_damping = 1.0  # Λ = 0 and λ = 1: P = I

    def fit_layers(self, ctx: Any) -> tuple[dict[str, tuple[Any, Any, Any]], int]:
        total = ctx.count_examples()
        return {name: (None, None, zeros) for name, zeros in ctx.zero_eigenvalues().items()}, total

    def from_sums(self, ctx: Any, sums: Any) -> tuple[dict[str, tuple[Any, Any, Any]], int]:
        return {name: (None, None, zeros) for name, zeros in ctx.zero_eigenvalues().items()}, int(sums.num_examples or 0)
