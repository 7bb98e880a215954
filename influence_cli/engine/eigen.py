"""Symmetric eigendecompositions of the pass-1 covariances: Kronecker eigenbases.

On the CPU they run single-threaded side by side (LAPACK's eigh scales badly with
threads on small matrices); under a process group they are dealt out to the ranks and
broadcast.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from influence_cli.engine.fitting import world_size
from influence_cli.errors import InfluenceError

if TYPE_CHECKING:  # pragma: no cover
    from influence_cli.engine.passes import CovarianceSums

__all__ = ["eigh_all", "eigh_psd", "eigen_bases", "bases_from_covariances"]


def eigh_all(matrices: dict[Any, Tensor], dist: Any = None) -> dict[Any, tuple[Tensor, Tensor]]:
    """Symmetric eigendecompositions in float64, checked for finiteness first.

    On the CPU, LAPACK's eigh scales badly with threads on small matrices, so each runs
    single-threaded while several run side by side. With a process group (``dist``), the
    matrices are dealt round-robin by size over the ranks and broadcast from their owner.
    """
    if world_size(dist) > 1:
        return eigh_distributed(matrices, dist)
    for key, mat in matrices.items():
        if not bool(torch.isfinite(mat).all()):
            layer, which = key
            raise InfluenceError(
                f"non-finite {which} covariance in layer {layer!r}: its activations or "
                "gradients overflowed or contain NaN (check inputs, checkpoint and learning rate)"
            )

    def one(mat: Tensor) -> tuple[Tensor, Tensor]:
        return eigh_psd(mat)

    items = sorted(matrices.items(), key=lambda kv: -kv[1].shape[0])
    on_cpu = all(m.device.type == "cpu" for m in matrices.values())
    threads = torch.get_num_threads()
    if not on_cpu or threads <= 1 or len(items) == 1:
        return {key: one(mat) for key, mat in items}
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(lambda kv: one(kv[1]), items))
    finally:
        torch.set_num_threads(threads)
    return {key: res for (key, _), res in zip(items, results)}


def eigh_psd(mat: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a covariance (PSD), in float64, eigenvalues ascending and ≥ 0.

    Rows whose diagonal entry is exactly zero are zero (PSD) — inputs that padding or a dead
    unit never set, e.g. the 8 outer taps of a 3×3 convolution on a 1×1 feature map (a
    ResNet's last stage on 32×32 images: 512 of 4,608 columns used). Those coordinates are
    eigenvectors with eigenvalue 0, so only the rest is decomposed: exact, and eigh's
    O(d³) falls with the cube of the share kept (a 4,608-wide eigh takes minutes here).
    """
    mat = mat.to(torch.float64)
    mat = 0.5 * (mat + mat.T)
    d = mat.shape[0]
    used = torch.diagonal(mat) != 0
    kept = int(used.sum())
    if kept == d:
        evals, evecs = torch.linalg.eigh(mat)
        return evals.clamp_(min=0.0), evecs
    idx = torch.nonzero(used, as_tuple=True)[0]
    zero = torch.nonzero(~used, as_tuple=True)[0]
    evals = torch.zeros(d, dtype=torch.float64, device=mat.device)
    evecs = torch.zeros(d, d, dtype=torch.float64, device=mat.device)
    evecs[zero, torch.arange(d - kept, device=mat.device)] = 1.0
    if kept:
        sub_vals, sub_vecs = torch.linalg.eigh(mat[idx][:, idx])
        evals[d - kept:] = sub_vals.clamp_(min=0.0)
        evecs[idx.unsqueeze(1), torch.arange(d - kept, d, device=mat.device).unsqueeze(0)] = sub_vecs
    return evals, evecs


def eigh_distributed(matrices: dict[Any, Tensor], dist: Any) -> dict[Any, tuple[Tensor, Tensor]]:
    # Same key order on every rank (sizes, then the key's text) so owners agree.
    items = sorted(matrices.items(), key=lambda kv: (-kv[1].shape[0], str(kv[0])))
    owner = {key: i % dist.world_size for i, (key, _m) in enumerate(items)}
    mine = {key: mat for key, mat in items if owner[key] == dist.rank}
    local = eigh_all(mine) if mine else {}
    out: dict[Any, tuple[Tensor, Tensor]] = {}
    for key, mat in items:
        d = mat.shape[0]
        if key in local:
            evals, evecs = local[key]
        else:
            evals = torch.empty(d, dtype=torch.float64, device=mat.device)
            evecs = torch.empty(d, d, dtype=torch.float64, device=mat.device)
        evals = dist.broadcast(evals.contiguous(), owner[key])
        evecs = dist.broadcast(evecs.contiguous(), owner[key])
        out[key] = (evals, evecs)
    return out


def bases_from_covariances(sums: "CovarianceSums", dist: Any = None) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """{layer: (λ_S, Q_S, λ_A, Q_A)} from (merged) pass-1 sums: normalise, eigendecompose."""
    cov_a, cov_s = sums.normalised()
    return eigen_bases(cov_a, cov_s, dist)


def eigen_bases(
    cov_a: dict[str, Tensor], cov_s: dict[str, Tensor], dist: Any = None
) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """{layer: (λ_S, Q_S, λ_A, Q_A)}: every A and S eigendecomposed (spread over ranks)."""
    mats: dict[tuple[str, str], Tensor] = {}
    for name in cov_a:
        mats[(name, "activation (A)")] = cov_a[name]
        mats[(name, "output-gradient (S)")] = cov_s[name]
    eig = eigh_all(mats, dist)
    s_key, a_key = "output-gradient (S)", "activation (A)"
    return {
        name: (eig[(name, s_key)][0], eig[(name, s_key)][1], eig[(name, a_key)][0], eig[(name, a_key)][1])
        for name in cov_a
    }
