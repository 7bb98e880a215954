"""ekfac: eigenvalue-corrected Kronecker factors (George et al. 2018), the default.

Per layer A = E[a aᵀ] and S = E[g gᵀ] are eigendecomposed (pass 1), then the eigenvalues
are re-fitted in that basis from the per-example gradients, Λ_jk = E_i[(Q_Sᵀ G_i Q_A)_jk²]
(pass 2). Pass 2 replays pass 1's captured batches when they fit in ``cache_bytes``.
"""

from __future__ import annotations

from typing import Any

from influence_cli.engine.strategy import BlockStrategy

__all__ = ["EKFAC"]


class EKFAC(BlockStrategy):
    name = "ekfac"
    description = "eigenvalue-corrected Kronecker factors (default; most accurate)"
    passes = ("covariance", "eigenvalues")

    def fit_layers(self, ctx: Any) -> tuple[dict[str, tuple[Any, Any, Any]], int]:
        from influence_cli.engine.passes import fit_eigenvalues, kronecker_bases

        bases, total, cache = kronecker_bases(ctx, ctx.cache_bytes)
        qs = {name: (b[1], b[3]) for name, b in bases.items()}
        lam, _ = fit_eigenvalues(ctx, qs, cache, expected=total)
        del cache
        return {name: (q[0], q[1], lam[name]) for name, q in qs.items()}, total

    def from_sums(self, ctx: Any, sums: Any) -> tuple[dict[str, tuple[Any, Any, Any]], int]:
        lam, total = sums.eigenvalues
        return {name: (b[1], b[3], lam[name] / total) for name, b in sums.bases.items()}, total
