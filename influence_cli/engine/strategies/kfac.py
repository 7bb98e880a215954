"""kfac: Kronecker factors A ⊗ S per layer, eigenvalues λ_S λ_Aᵀ (one data pass)."""

from __future__ import annotations

from typing import Any

from influence_cli.engine.strategy import BlockStrategy

__all__ = ["KFAC"]


def _outer(l_s: Any, l_a: Any) -> Any:
    import torch

    return torch.outer(l_s, l_a)


class KFAC(BlockStrategy):
    name = "kfac"
    description = "Kronecker factors A ⊗ S, no eigenvalue correction"
    passes = ("covariance",)

    def fit_layers(self, ctx: Any) -> tuple[dict[str, tuple[Any, Any, Any]], int]:
        from influence_cli.engine.passes import kronecker_bases

        bases, total, _ = kronecker_bases(ctx)
        return {name: (q_s, q_a, _outer(l_s, l_a)) for name, (l_s, q_s, l_a, q_a) in bases.items()}, total

    def from_sums(self, ctx: Any, sums: Any) -> tuple[dict[str, tuple[Any, Any, Any]], int]:
        total = sums.covariance.examples if sums.covariance is not None else int(sums.num_examples or 0)
        return {name: (q_s, q_a, _outer(l_s, l_a)) for name, (l_s, q_s, l_a, q_a) in sums.bases.items()}, total
