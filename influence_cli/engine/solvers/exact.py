"""The dense solver behind the ``exact`` strategy: (K + λI)⁻¹ over all tracked layers.

The dense P×P curvature K over the whole training set, factorised once (Cholesky of
K + λI, LU if that is not positive definite). Memory ≈ P²·8 bytes while fitting, so it
refuses models above ``max_params``. Cross-layer curvature is kept, unlike the
block-diagonal strategies.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from influence_cli.engine.batching import ProgressCallback, iterate_batches, prepare_model
from influence_cli.engine.curvature import ROW_ELEMENTS, CurvatureProducts, check_curvature, pseudo_gradient_batches
from influence_cli.engine.damping import damping_value
from influence_cli.engine.flat import (
    DENSE_DAMPING_FACTOR,
    FlatBound,
    ParameterLayout,
    flat_gradients,
    layout_meta,
    modules_info,
    num_params,
    read_solver,
    solver_meta,
)
from influence_cli.engine.kernels import accumulate_gram, mirror_upper
from influence_cli.engine.storage import atomic_save, inconsistent_factors, merge_extra_meta
from influence_cli.engine.tracked import check_tracked, eval_mode, to_weight_order, tracked_modules
from influence_cli.errors import InfluenceError

__all__ = ["ExactSolver", "fit_exact"]

# Solve in float64 when the float64 copy of the factor stays small (P² · 8 bytes).
_FLOAT64_SOLVE_MAX_P = 4096


@dataclass
class ExactSolver:
    """(K + λI)⁻¹ from one dense factorisation of the curvature over all tracked layers.

    factorization "cholesky": ``factor`` = L with LLᵀ = K + λI; self-influence is
    ‖L⁻¹g‖² ≥ 0. "lu" (K + λI not positive definite, e.g. an indefinite Hessian away
    from a minimum): ``factor``/``pivots`` from lu_factor; self-influence can then be
    negative.
    """

    curvature: str
    damping: float
    damping_rule: str | float
    num_examples: int
    factor: Tensor
    factorization: str  # "cholesky" | "lu"
    modules_info: dict[str, tuple[str, int, int, bool]]
    pivots: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    strategy: str = "exact"
    _cache: tuple | None = field(default=None, repr=False)

    @property
    def num_params(self) -> int:
        return int(self.factor.shape[0])

    def check_model(self, model: nn.Module) -> dict[str, nn.Module]:
        """The model's modules matching the stored layers; FactorsError on mismatch."""
        return check_tracked(model, self.modules_info)

    def _work(self, x: Tensor) -> tuple[Tensor, Tensor | None, torch.dtype]:
        """Factor (and pivots) on x's device in the solve dtype: float64 when small.

        The converted copy is cached, so repeated calls (one per chunk of examples) do
        not copy P² elements each time.
        """
        dtype = torch.float64 if self.num_params <= _FLOAT64_SOLVE_MAX_P else self.factor.dtype
        dtype = torch.promote_types(dtype, x.dtype)
        key = (x.device, dtype)
        if self._cache is None or self._cache[0] != key:
            factor = self.factor.to(device=x.device, dtype=dtype)
            pivots = None if self.pivots is None else self.pivots.to(device=x.device)
            self._cache = (key, factor, pivots)
        return self._cache[1], self._cache[2], dtype

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.num_params:
            raise InfluenceError(f"expected (T, {self.num_params}) vectors, got {tuple(x.shape)}")

    def precondition_flat(self, x: Tensor) -> Tensor:
        """(K + λI)⁻¹ xᵀ for every row of x (T, P) → (T, P)."""
        self._check(x)
        factor, pivots, dtype = self._work(x)
        rhs = x.to(dtype).T
        if self.factorization == "cholesky":
            out = torch.cholesky_solve(rhs, factor, upper=False)
        else:
            out = torch.linalg.lu_solve(factor, pivots, rhs)
        return out.T.to(x.dtype)

    def self_scores(self, x: Tensor) -> Tensor:
        """xᵀ (K + λI)⁻¹ x per row → (T,); ‖L⁻¹x‖² for Cholesky (half the flops)."""
        self._check(x)
        if self.factorization != "cholesky":
            return (self.precondition_flat(x) * x).sum(1)
        return self.whiten(x).square().sum(0).to(x.dtype)

    @property
    def can_whiten(self) -> bool:
        return self.factorization == "cholesky"

    def whiten(self, x: Tensor) -> Tensor:
        """L⁻¹xᵀ (P, T) in the solve dtype, with LLᵀ = K + λI (Cholesky only): every
        quadratic form xᵀ(K + λI)⁻¹y of the rows is then a dot product of columns."""
        self._check(x)
        factor, _pivots, dtype = self._work(x)
        return torch.linalg.solve_triangular(factor, x.to(dtype).T, upper=False)

    def bind(
        self, model: nn.Module, device: torch.device, *, loader: Any = None, on_batch: Any = None
    ) -> FlatBound:
        """This solver on ``model`` for the scoring loop."""
        return FlatBound(self, model, device)

    def save(self, directory: str | os.PathLike, extra_meta: dict[str, Any] | None = None) -> Path:
        """Atomic safetensors + meta.json, same contract as :meth:`Factors.save`."""
        target = Path(directory)
        meta = solver_meta("exact", layout_meta(self.modules_info), self.num_examples, self.damping, self.damping_rule, self.curvature)
        meta["factorization"] = self.factorization
        meta["num_params"] = self.num_params
        meta["dtype"] = str(self.factor.dtype).replace("torch.", "")
        meta = merge_extra_meta(meta, extra_meta)
        tensors = {"exact::factor": self.factor.detach().cpu().contiguous()}
        if self.pivots is not None:
            tensors["exact::pivots"] = self.pivots.detach().cpu().contiguous()
        atomic_save(target, tensors, meta)
        self.meta = meta
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ExactSolver":
        meta, tensors = read_solver(directory, "exact")
        try:
            info = modules_info(meta)
            factor = tensors["exact::factor"]
            p = num_params(info)
            if tuple(factor.shape) != (p, p):
                raise ValueError(f"factor has shape {tuple(factor.shape)}, expected ({p}, {p})")
            how = str(meta["factorization"])
            if how not in ("cholesky", "lu"):
                raise ValueError(f"unknown factorization {how!r}")
            pivots = tensors["exact::pivots"] if how == "lu" else None
            return cls(
                curvature=str(meta["curvature"]),
                damping=float(meta["damping"]),
                damping_rule=meta["damping_rule"],
                num_examples=int(meta["num_examples"]),
                factor=factor,
                factorization=how,
                modules_info=info,
                pivots=pivots,
                meta=meta,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise inconsistent_factors(directory, exc) from None


def _refuse_large(p: int, max_params: int) -> None:
    if p > max_params:
        raise InfluenceError(
            f"exact: the tracked layers have {p:,} parameters, above influence.exact.max_params = "
            f"{max_params:,}; raise it (memory ≈ P²·8 bytes = {p * p * 8 / 2**30:.1f} GiB) or use ekfac"
        )


def _gn_kronecker(acc: dict[tuple[str, str], Tensor], layout: ParameterLayout, layers, n: int, classes: int) -> None:
    """Rank-one layers: GN block (l, l') += Σ_i (Σ_c g_ic g'_icᵀ) ⊗ (a_i a'_iᵀ).

    Contracting the C pseudo-gradients first costs n·P_l·P_l' per block instead of
    n·C·P_l·P_l' for the explicit rows: C times fewer flops. Accumulated in the
    (d_out, d_out', d_in, d_in') layout; permuted once at the end.
    """
    names = list(layout.slots)
    # (n, d_in) in weight column order: identical across the C replicas
    a = {k: to_weight_order(layers[k].a[:n, 0], layers[k].perm, 1) for k in names}
    g = {k: layers[k].g[:, 0].reshape(classes, n, -1) for k in names}  # (C, n, d_out)
    for x, left in enumerate(names):
        for right in names[x:]:
            s = torch.einsum("cno,cnp->nop", g[left], g[right]).reshape(n, -1)
            w = (a[left][:, :, None] * a[right][:, None, :]).reshape(n, -1)
            key = (left, right)
            if key not in acc:
                acc[key] = s.new_zeros(s.shape[1], w.shape[1])
            acc[key].addmm_(s.T, w)


def _assemble_kronecker(acc: dict[tuple[str, str], Tensor], layout: ParameterLayout, k: Tensor) -> None:
    for (left, right), block in list(acc.items()):
        sl, sr = layout.slots[left], layout.slots[right]
        full = block.view(sl.d_out, sr.d_out, sl.d_in, sr.d_in).permute(0, 2, 1, 3).reshape(sl.size, sr.size)
        k[sl.span, sr.span] = full
        if left != right:
            k[sr.span, sl.span] = full.T
        del acc[(left, right)], full, block


def work_dtype(dtype: torch.dtype, p: int) -> torch.dtype:
    """The dtype K is built and factorised in: float64, unless the factor is stored in float32
    and too large to be solved in float64 anyway (P > 4,096). Then float32 halves the two
    dominant costs (the N·P² curvature GEMMs and the P³/3 Cholesky) at no loss the float32
    solve would not already have."""
    return torch.float32 if dtype == torch.float32 and p > _FLOAT64_SOLVE_MAX_P else torch.float64


def _dense_gauss_newton(model, layout, loader, dev, on_batch, work: torch.dtype = torch.float64) -> tuple[Tensor, int]:
    """Σ_i J_iᵀ H_out J_i (in ``work``, unscaled) and N over the loader."""
    p = layout.size
    k = torch.zeros(p, p, dtype=work, device=dev)
    kron: dict[tuple[str, str], Tensor] = {}
    total = 0
    rank_one: bool | None = None
    for n, classes, layers in pseudo_gradient_batches(
        model, layout.modules, iterate_batches(loader, dev), work
    ):
        if rank_one is None:
            rank_one = all(b.positions == 1 for b in layers.values())
        if rank_one:
            _gn_kronecker(kron, layout, layers, n, classes)
        else:
            rows = n * classes
            step = max(1, ROW_ELEMENTS // p)
            for start in range(0, rows, step):
                chunk = {
                    name: type(b)(b.a[start : start + step], b.g[start : start + step], b.perm)
                    for name, b in layers.items()
                }
                accumulate_gram(k, flat_gradients(layout, chunk, work))
        total += n
        del layers
        if on_batch is not None:
            on_batch("curvature", n)
    if rank_one:
        _assemble_kronecker(kron, layout, k)
    elif rank_one is not None:
        mirror_upper(k)
    return k, total


def _dense_hessian(model, layout, loader, dev, on_batch) -> tuple[Tensor, int]:
    """Σ_i ∇²ℓ_i (float64, unscaled): P hvps in vmapped chunks of basis vectors."""
    p = layout.size
    products = CurvatureProducts(model, layout, "hessian")
    batches = list(iterate_batches(loader, dev))
    total = sum(int(y.shape[0]) for _x, y in batches)
    k = torch.zeros(p, p, dtype=torch.float64, device=dev)
    dtype = next(iter(products.tracked.values())).dtype
    step = min(p, 256)  # basis vectors per vmapped hvp
    for start in range(0, p, step):
        stop = min(p, start + step)
        basis = torch.zeros(stop - start, p, dtype=dtype, device=dev)
        basis[:, start:stop] = torch.eye(stop - start, dtype=dtype, device=dev)
        for x, y in batches:
            k[start:stop] += products.product(x, y, basis).to(torch.float64)
        if on_batch is not None:
            on_batch("curvature", stop - start)
    return 0.5 * (k + k.T), total


def fit_exact(
    model: nn.Module,
    loader: Iterable,
    *,
    modules: list[str] | dict[str, nn.Module] | None = None,
    curvature: str = "gauss_newton",
    damping: str | float = "auto",
    damping_factor: float = DENSE_DAMPING_FACTOR,
    max_params: int = 20000,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    on_batch: ProgressCallback | None = None,
) -> ExactSolver:
    """Dense curvature K (mean over the loader) of the tracked layers, factorised once.

    curvature: "gauss_newton" (PSD) or "hessian" (exact, may be indefinite).
    damping: "auto" = damping_factor (3) × trace(K)/P (global), or a
        positive number.
    max_params: refuse (before any data pass) when P exceeds it; memory ≈ P²·8 bytes.
    dtype: storage dtype of the factor; K is built and factorised in float64 (float32 for a
        float32 factor above 4,096 parameters, which is solved in float32: :func:`work_dtype`).
    on_batch("curvature", n) after each batch (hessian: after each chunk of P columns).
    """
    check_curvature(curvature)
    damping_value(damping, torch.ones(1), damping_factor)  # validate early
    tracked = tracked_modules(model, modules)
    layout = ParameterLayout(tracked)
    _refuse_large(layout.size, int(max_params))
    dev = prepare_model(model, device)
    with eval_mode(model):
        if curvature == "gauss_newton":
            k, total = _dense_gauss_newton(model, layout, loader, dev, on_batch, work_dtype(dtype, layout.size))
        else:
            k, total = _dense_hessian(model, layout, loader, dev, on_batch)
    if total == 0:
        raise InfluenceError("the data loader yielded no examples")
    k /= total
    if not bool(torch.isfinite(k).all()):
        raise InfluenceError("exact: non-finite curvature (check the inputs and the checkpoint)")
    lam = damping_value(damping, torch.diagonal(k), damping_factor)
    k.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(k)
    pivots = None
    how = "cholesky"
    if int(info) != 0:
        del factor
        factor, pivots = torch.linalg.lu_factor(k)
        how = "lu"
    del k
    return ExactSolver(
        curvature=curvature,
        damping=lam,
        damping_rule=damping,
        num_examples=total,
        factor=factor.to(dtype).cpu(),
        factorization=how,
        modules_info=layout.info(),
        pivots=None if pivots is None else pivots.cpu(),
    )
