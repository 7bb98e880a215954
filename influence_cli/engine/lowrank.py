"""The low-rank query path (``influence.query_rank: k``): an approximation of pairwise scores.

Each preconditioned query gradient of a layer, M_t = P(G_t) (d_out × d_in), is replaced by
its best rank-k approximation M_t ≈ U_t S_t V_tᵀ. For a training example with captured
(a_i, g_i) over P positions, tr(M_tᵀ G_i) = Σ_p g_ipᵀ M_t a_ip then costs
P·k·(d_in + d_out) instead of d_out·d_in (plus P·d_out·d_in to build G_i when P > 1):

    score(t, i) ≈ Σ_p Σ_j (g_ipᵀ u_tj) (s_tj v_tjᵀ a_ip)

as two GEMMs over all test rows at once (g @ [U_1 … U_T], a @ [V_1 S_1 … V_T S_T]) and a
reduction. Conv layers (P > 1, G_i not rank one) use the same formula; per batch the
factored form is used only where it costs fewer flops than the dense contraction with M_t
(wide layers with few positions), otherwise the dense rank-k M_t is contracted as usual —
both give the same number.

The truncation is a randomized range finder with power iterations (Halko, Martinsson &
Tropp 2011), seeded and batched over test rows: a full SVD of T wide matrices costs more
than the exact scores it would replace. The small projected matrix B = QᵀM is decomposed
through its w×w Gram in float64 (an eigh, not a w×d_in SVD). With ``ITERATIONS`` power steps and ``OVERSAMPLE``
extra columns it agrees with the exact truncated SVD to float32 precision whenever
σ_{k+p+1}/σ_k is not close to 1; when k ≥ min(d_out, d_in) the matrix is left as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from influence_cli.engine.kernels import matmul_t

__all__ = ["ITERATIONS", "OVERSAMPLE", "factored_scores", "prefer_factored", "rank_k", "truncated_svd"]

OVERSAMPLE = 10
ITERATIONS = 2  # 3 gave the same agreement on mlp784 (rel. error 0.0104 vs 0.0105) at +10 % time
_SEED = 0
_FACTORED_ELEMENTS = 4 * 1024 * 1024  # elements of one (rows, t·k) intermediate


def _orthonormal(x: Tensor) -> Tensor:
    return torch.linalg.qr(x).Q


def truncated_svd(m: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(U (T, d_out, k), V·S (T, d_in, k)) with U (VS)ᵀ ≈ the best rank-k approximation of
    every M_t in m (T, d_out, d_in). Deterministic (fixed seed)."""
    _t, d_out, d_in = m.shape
    width = min(k + OVERSAMPLE, d_out, d_in)
    if width >= min(d_out, d_in):  # the sketch would span everything: exact SVD of a small matrix
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :, :k].contiguous(), (vh[:, :k, :] * s[:, :k, None]).transpose(1, 2).contiguous()
    gen = torch.Generator(device=m.device).manual_seed(_SEED)
    omega = torch.randn(d_in, width, generator=gen, device=m.device, dtype=m.dtype)
    q = _orthonormal(torch.matmul(m, omega))  # (T, d_out, w): the range of M_t
    m_t = m.transpose(1, 2)
    for _ in range(ITERATIONS):
        q = _orthonormal(torch.bmm(m, _orthonormal(torch.bmm(m_t, q))))
    b = torch.bmm(q.transpose(1, 2), m)  # (T, w, d_in)
    # SVD of the short-wide b through its w×w Gram, in float64: b bᵀ = U_b S² U_bᵀ and
    # V S = bᵀ U_b, so no division by small singular values and no (w × d_in) SVD.
    _evals, ub = torch.linalg.eigh(torch.bmm(b, b.transpose(1, 2)).double())
    ub = ub.flip(-1)[:, :, :k].to(m.dtype)  # the k largest, descending
    return torch.bmm(q, ub).contiguous(), torch.bmm(b.transpose(1, 2), ub).contiguous()


def rank_k(m: Tensor, k: int) -> Tensor:
    """The rank-k approximation of every M_t as dense (T, d_out, d_in) (unchanged if k ≥ rank)."""
    if k >= min(m.shape[1], m.shape[2]):
        return m
    u, sv = truncated_svd(m, k)
    return torch.bmm(u, sv.transpose(1, 2))


def prefer_factored(d_out: int, d_in: int, positions: int, k: int, num_test: int) -> bool:
    """Factored contraction iff it counts fewer flops per training example than the
    dense one (which builds G_i first when positions > 1)."""
    dense = d_out * d_in * (num_test + (positions if positions > 1 else 0))
    factored = positions * num_test * k * (d_in + d_out + 1)
    return factored < dense


def factored_scores(u_rows: Tensor, sv_rows: Tensor, k: int, a: Tensor, g: Tensor) -> Tensor:
    """Σ_p Σ_j (g_ipᵀ u_tj)(a_ipᵀ (vs)_tj) → (n, T), for u_rows (T·k, d_out), sv_rows
    (T·k, d_in) (row t·k + j = column j of U_t, V_t S_t) and captured a (n, P, d_in),
    g (n, P, d_out). GEMMs over all test rows, chunked to bound the intermediates."""
    n, positions, d_in = a.shape
    d_out = g.shape[2]
    num_test = u_rows.shape[0] // k
    out = a.new_empty(n, num_test)
    step_t = max(1, min(num_test, _FACTORED_ELEMENTS // max(1, positions * k)))
    step_n = max(1, _FACTORED_ELEMENTS // max(1, positions * step_t * k))
    for i0 in range(0, n, step_n):
        i1 = min(n, i0 + step_n)
        a_rows = a[i0:i1].reshape(-1, d_in).contiguous()
        g_rows = g[i0:i1].reshape(-1, d_out).contiguous()
        for t0 in range(0, num_test, step_t):
            t1 = min(num_test, t0 + step_t)
            gu = matmul_t(g_rows, u_rows[t0 * k : t1 * k])  # (c·P, t·k)
            av = matmul_t(a_rows, sv_rows[t0 * k : t1 * k])
            out[i0:i1, t0:t1] = gu.mul_(av).view(i1 - i0, positions, t1 - t0, k).sum((1, 3))
    return out
