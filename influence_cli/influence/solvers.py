"""Strategies that are not per-layer eigenbases: ``exact`` (dense) and ``lissa`` (iterative).

Both precondition flat vectors over every tracked layer at once (see
:class:`~influence_cli.influence.curvature.ParameterLayout`), so cross-layer curvature is
kept, unlike the block-diagonal strategies. ``scores`` dispatches to them through the
same three methods: ``check_model``, ``precondition_flat`` and ``self_scores``.

- exact: the dense P×P curvature K over the whole training set, factorised once
  (Cholesky of K + λI, LU if that is not positive definite). Memory ≈ P²·8 bytes while
  fitting, so it refuses models above ``max_params``.
- lissa: the stochastic Neumann-series recursion of Agarwal et al. (2017), as used by
  Koh & Liang (2017); only curvature-vector products, any model size, but every solve
  costs ``depth × repeats`` minibatch products.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from influence_cli.errors import FactorsError, InfluenceError
from influence_cli.influence.curvature import (
    CurvatureProducts,
    ParameterLayout,
    check_curvature,
    flat_gradients,
    pseudo_gradient_batches,
)
from influence_cli.influence.factors import (
    AUTO_DAMPING_SCALE,
    DEFAULT_DAMPING_FACTORS,
    FORMAT_VERSION,
    SOLVER_STRATEGIES,
    STRATEGIES,
    Factors,
    ProgressCallback,
    _accumulate_gram,
    _mirror_upper,
    _damping_value,
    atomic_save,
    check_tracked,
    read_stored,
    iterate_batches,
    merge_extra_meta,
    resolve_device,
)
from influence_cli.influence.modules import eval_mode, select_modules, to_weight_order

__all__ = [
    "ExactSolver",
    "LissaSolver",
    "LissaDivergenceError",
    "fit_exact",
    "fit_lissa",
    "load_factors",
    "SOLVER_STRATEGIES",
    "LISSA_SCALE_MARGIN",
    "AUTO_DAMPING_SCALE",
    "SOLVER_DAMPING_FACTOR",  # damping "auto" = this × trace(K)/P (see factors.DEFAULT_DAMPING_FACTORS)
]

# Solve in float64 when the float64 copy of the factor stays small (P² · 8 bytes).
_FLOAT64_SOLVE_MAX_P = 4096
# Elements of one (rows, P) block of pseudo-gradients / hvp outputs built in one go.
_ROW_ELEMENTS = 16 * 1024 * 1024
# LiSSA scale = margin × (λ_max + λ) of the full-data curvature. The recursion contracts
# iff every minibatch eigenvalue μ̃ satisfies 0 < (μ̃ + λ)/scale < 2, so margin m
# tolerates minibatch top eigenvalues up to 2m·λ_max. On a trained digits MLP
# (64→128→10, 1,400 examples; scripts/solvers_digits.py) the top Gauss-Newton eigenvalue
# of 64-example minibatches measured 1.42 × the full-data one on average and 2.54 × at
# worst (20 batches), so 2 (tolerating 4×) leaves a factor ≈ 1.6 of slack; each doubling
# of the margin doubles the depth needed, so it is not set higher.
SOLVER_DAMPING_FACTOR = DEFAULT_DAMPING_FACTORS["exact"]
LISSA_SCALE_MARGIN = 2.0
# Divergence: a contracting recursion has ‖h_j‖ ≤ (j + 1)·‖v‖ (each Neumann term is at
# most ‖v‖); allow 10× that for minibatch noise. A blow-up by a factor r per step passes
# the bound after ~log(10 j)/log r steps (≈ 12 for r = 1.5, ≈ 50 for r = 1.1).
_DIVERGENCE_SLACK = 10.0
_POWER_ITERATIONS = 50
_HUTCHINSON_PROBES = 32


class LissaDivergenceError(InfluenceError):
    """The LiSSA recursion blew up: the scale is too small for the curvature."""


def _tracked(model: nn.Module, modules: list[str] | dict[str, nn.Module] | None) -> dict[str, nn.Module]:
    tracked = modules if isinstance(modules, dict) else select_modules(model, modules)
    if not tracked:
        raise InfluenceError("nothing to track: the module selection is empty")
    return tracked


def _prepare(model: nn.Module, device: torch.device | str | None) -> torch.device:
    dev = resolve_device(model, device)
    if any(p.device != dev for p in model.parameters()):
        model.to(dev)
    return dev


def _package_version() -> str:
    try:
        from influence_cli import __version__ as version
    except ImportError:  # pragma: no cover
        version = "0"
    return str(version)


def _base_meta(strategy: str, layout_meta: dict[str, Any], num_examples: int, damping: float,
               damping_rule: str | float, curvature: str) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "strategy": strategy,
        "num_examples": int(num_examples),
        "damping": float(damping),
        "damping_rule": damping_rule,
        "curvature": curvature,
        "package_version": _package_version(),
        "modules": layout_meta,
    }


def _read(directory: str | os.PathLike, strategy: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    directory = Path(directory)
    meta = Factors.read_meta(directory)
    if meta.get("strategy") != strategy:
        raise FactorsError(
            f"factors at {directory} are {meta.get('strategy')!r}, not {strategy!r}; use load_factors"
        )
    return read_stored(directory)


def _modules_info(meta: dict[str, Any]) -> dict[str, tuple[str, int, int, bool]]:
    info = {
        name: (str(m["kind"]), int(m["d_out"]), int(m["d_in"]), bool(m["has_bias"]))
        for name, m in meta["modules"].items()
    }
    if not info:
        raise ValueError("no tracked module")
    return info


def _num_params(info: dict[str, tuple[str, int, int, bool]]) -> int:
    return sum(d_out * d_in for _k, d_out, d_in, _b in info.values())


# ======================================================================== exact
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
        factor, _pivots, dtype = self._work(x)
        z = torch.linalg.solve_triangular(factor, x.to(dtype).T, upper=False)
        return z.square().sum(0).to(x.dtype)

    def save(self, directory: str | os.PathLike, extra_meta: dict[str, Any] | None = None) -> Path:
        """Atomic safetensors + meta.json, same contract as :meth:`Factors.save`."""
        target = Path(directory)
        layout_meta = {
            name: {"kind": k, "d_out": o, "d_in": i, "has_bias": b}
            for name, (k, o, i, b) in self.modules_info.items()
        }
        meta = _base_meta("exact", layout_meta, self.num_examples, self.damping, self.damping_rule, self.curvature)
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
        meta, tensors = _read(directory, "exact")
        try:
            info = _modules_info(meta)
            factor = tensors["exact::factor"]
            p = _num_params(info)
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
            raise FactorsError(
                f"factors at {directory} are incomplete or inconsistent ({exc}); re-run fit-factors"
            ) from None


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


def _dense_gauss_newton(model, layout, loader, dev, on_batch) -> tuple[Tensor, int]:
    """Σ_i J_iᵀ H_out J_i (float64, unscaled) and N over the loader."""
    p = layout.size
    k = torch.zeros(p, p, dtype=torch.float64, device=dev)
    kron: dict[tuple[str, str], Tensor] = {}
    total = 0
    rank_one: bool | None = None
    for n, classes, layers in pseudo_gradient_batches(
        model, layout.modules, iterate_batches(loader, dev), torch.float64
    ):
        if rank_one is None:
            rank_one = all(b.positions == 1 for b in layers.values())
        if rank_one:
            _gn_kronecker(kron, layout, layers, n, classes)
        else:
            rows = n * classes
            step = max(1, _ROW_ELEMENTS // p)
            for start in range(0, rows, step):
                chunk = {
                    name: type(b)(b.a[start : start + step], b.g[start : start + step], b.perm)
                    for name, b in layers.items()
                }
                _accumulate_gram(k, flat_gradients(layout, chunk, torch.float64))
        total += n
        del layers
        if on_batch is not None:
            on_batch("curvature", n)
    if rank_one:
        _assemble_kronecker(kron, layout, k)
    elif rank_one is not None:
        _mirror_upper(k)
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
    damping_factor: float = SOLVER_DAMPING_FACTOR,
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
    dtype: storage dtype of the factor; K is built and factorised in float64.
    on_batch("curvature", n) after each batch (hessian: after each chunk of P columns).
    """
    check_curvature(curvature)
    _damping_value(damping, torch.ones(1), damping_factor)  # validate early
    tracked = _tracked(model, modules)
    layout = ParameterLayout(tracked)
    _refuse_large(layout.size, int(max_params))
    dev = _prepare(model, device)
    with eval_mode(model):
        build = _dense_gauss_newton if curvature == "gauss_newton" else _dense_hessian
        k, total = build(model, layout, loader, dev, on_batch)
    if total == 0:
        raise InfluenceError("the data loader yielded no examples")
    k /= total
    if not bool(torch.isfinite(k).all()):
        raise InfluenceError("exact: non-finite curvature (check the inputs and the checkpoint)")
    lam = _damping_value(damping, torch.diagonal(k), damping_factor)
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


# ======================================================================== lissa
class _Minibatches:
    """Fresh training minibatches for the recursion, reproducible from a seed.

    Samples by index (epochs of seeded permutations) when the loader's dataset holds
    ``inputs``/``labels`` tensors (respecting a loader's ``indices`` subset); otherwise
    cycles through the loader's own batches.
    """

    def __init__(self, loader: Iterable, batch_size: int, device: torch.device):
        self.loader = loader
        self.batch_size = int(batch_size)
        self.device = device
        dataset = getattr(loader, "dataset", None)
        inputs = getattr(dataset, "inputs", None)
        labels = getattr(dataset, "labels", None)
        self.indexed = isinstance(inputs, Tensor) and isinstance(labels, Tensor)
        if self.indexed:
            self.inputs, self.labels = inputs, labels
            pool = getattr(loader, "indices", None)
            self.pool = pool if isinstance(pool, Tensor) else torch.arange(len(labels))

    def stream(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        if not self.indexed:
            while True:
                empty = True
                for batch in iterate_batches(self.loader, self.device):
                    empty = False
                    yield batch
                if empty:
                    raise InfluenceError("the data loader yielded no examples")
        generator = torch.Generator().manual_seed(int(seed))
        size = len(self.pool)
        if size == 0:
            raise InfluenceError("the training set is empty")
        b = min(self.batch_size, size)
        while True:
            order = self.pool[torch.randperm(size, generator=generator)]
            for start in range(0, size - b + 1, b):
                idx = order[start : start + b]
                yield (
                    self.inputs[idx].to(self.device),
                    self.labels[idx].to(device=self.device, dtype=torch.long),
                )


@dataclass
class LissaSolver:
    """(K + λI)⁻¹ by the LiSSA recursion, for a batch of vectors at once.

    h_0 = v; h_j = v + h_{j−1} − (K̃_j h_{j−1} + λ h_{j−1}) / scale with K̃_j the
    curvature of a fresh minibatch; estimate h_depth / scale, averaged over ``repeats``
    runs with seeds seed, seed + 1, .... Needs the model and training data:
    :meth:`bind` (done by fit_lissa and by the scoring functions).
    """

    curvature: str
    damping: float
    damping_rule: str | float
    scale: float
    scale_rule: str | float
    depth: int
    repeats: int
    batch_size: int
    seed: int
    num_examples: int
    modules_info: dict[str, tuple[str, int, int, bool]]
    lambda_max: float | None = None
    vector_chunk: int = 256  # vectors solved together (memory ∝ chunk × minibatch activations)
    meta: dict[str, Any] = field(default_factory=dict)
    strategy: str = "lissa"
    last_report: dict[str, Any] = field(default_factory=dict)
    on_vectors: Callable[[str, int], None] | None = field(default=None, repr=False)  # progress: ("lissa solves", rows)
    _model: nn.Module | None = field(default=None, repr=False)
    _products: CurvatureProducts | None = field(default=None, repr=False)
    _batches: _Minibatches | None = field(default=None, repr=False)

    @property
    def num_params(self) -> int:
        return _num_params(self.modules_info)

    @property
    def unconverged_fraction(self) -> float:
        """(1 − λ/scale)^(depth+1): the share of the solution along the flattest curvature
        directions (eigenvalue ≈ 0) that the truncated Neumann series Σ_{i≤depth} has not
        reached. Near 1 means the estimate is mostly missing there; raise depth or λ."""
        rate = min(1.0, max(0.0, self.damping / self.scale))
        return float((1.0 - rate) ** (self.depth + 1))

    def depth_for(self, fraction: float = 0.1) -> int:
        """Steps needed to bring :attr:`unconverged_fraction` down to ``fraction``."""
        rate = min(1.0, max(1e-300, self.damping / self.scale))
        if rate >= 1.0:
            return 1
        return max(1, int(math.ceil(math.log(fraction) / math.log1p(-rate))) - 1)

    @property
    def cost_note(self) -> str:
        """Why this is slow: for callers' warnings."""
        return (
            f"LiSSA: every preconditioned vector costs depth × repeats = {self.depth * self.repeats} "
            f"curvature-vector products on minibatches of {self.batch_size}; self-influence "
            "solves one such system per training example"
        )

    def check_model(self, model: nn.Module) -> dict[str, nn.Module]:
        return check_tracked(model, self.modules_info)

    def bind(self, model: nn.Module, loader: Iterable, device: torch.device | str | None = None) -> "LissaSolver":
        """Attach the model and the training data the curvature products need.

        The scoring functions call this with the loader they are given (the training
        set), so a loaded solver needs nothing else; minibatches are drawn from it.
        """
        modules = self.check_model(model)
        dev = _prepare(model, device)
        self._model = model
        self._products = CurvatureProducts(model, ParameterLayout(modules), self.curvature)
        self._batches = _Minibatches(loader, self.batch_size, dev)
        return self

    def _solve_once(self, v: Tensor, seed: int) -> Tensor:
        assert self._products is not None and self._batches is not None and self._model is not None
        stream = self._batches.stream(seed)
        v_norm = v.norm(dim=1)
        live = v_norm > 0
        h = v.clone()
        changes: list[float] = []
        with eval_mode(self._model):
            for j in range(1, self.depth + 1):
                x, y = next(stream)
                kh = self._products.product(x, y, h) / int(y.shape[0])
                new = v + h - (kh + self.damping * h) / self.scale
                norms = new.norm(dim=1)
                ratio = float((norms[live] / v_norm[live]).max()) if bool(live.any()) else 0.0
                if not math.isfinite(ratio) or ratio > _DIVERGENCE_SLACK * (j + 1):
                    raise LissaDivergenceError(
                        f"LiSSA diverged at step {j} of {self.depth} (‖h‖/‖v‖ = {ratio:.3g}): raise "
                        f"influence.lissa.scale (now {self.scale:.4g}; try {2 * self.scale:.4g}) or the damping"
                    )
                if j > self.depth - 10:
                    diff = (new - h).norm(dim=1)[live] / norms[live].clamp_min(1e-300)
                    changes.append(float(diff.max()) if diff.numel() else 0.0)
                h = new
        self.last_report["relative_change"] = changes
        return h / self.scale

    def precondition_flat(self, x: Tensor) -> Tensor:
        """(K + λI)⁻¹ xᵀ for every row of x (T, P), all rows as one batch of vectors."""
        if self._products is None:
            raise InfluenceError("LissaSolver needs the model and training data: call bind(model, loader)")
        if x.dim() != 2 or x.shape[1] != self.num_params:
            raise InfluenceError(f"expected (T, {self.num_params}) vectors, got {tuple(x.shape)}")
        dtype = next(iter(self._products.tracked.values())).dtype
        out = torch.empty_like(x)
        worst = 0.0
        # Row chunks bound the vmapped products' memory; every chunk sees the same
        # minibatch sequence, so the result does not depend on the chunking.
        for start in range(0, x.shape[0], self.vector_chunk):
            v = x[start : start + self.vector_chunk].to(dtype)
            total = None
            for r in range(self.repeats):
                est = self._solve_once(v, self.seed + r)
                total = est if total is None else total + est
                worst = max([worst, *self.last_report["relative_change"]])
            out[start : start + v.shape[0]] = (total / self.repeats).to(x.dtype)
            if self.on_vectors is not None:
                self.on_vectors("lissa solves", int(v.shape[0]))
        self.last_report["depth"] = self.depth
        # Max over the last steps of ‖h_j − h_{j−1}‖/‖h_j‖: a value well above the
        # minibatch noise level means depth was too small.
        self.last_report["final_relative_change"] = worst
        return out

    def self_scores(self, x: Tensor) -> Tensor:
        """xᵀ (K + λI)⁻¹ x per row (one LiSSA solve per row, batched)."""
        return (self.precondition_flat(x) * x).sum(1)

    def save(self, directory: str | os.PathLike, extra_meta: dict[str, Any] | None = None) -> Path:
        """Same file contract as every strategy; only the resolved parameters are stored."""
        layout_meta = {
            name: {"kind": k, "d_out": o, "d_in": i, "has_bias": b}
            for name, (k, o, i, b) in self.modules_info.items()
        }
        meta = _base_meta("lissa", layout_meta, self.num_examples, self.damping, self.damping_rule, self.curvature)
        meta.update(
            scale=float(self.scale), scale_rule=self.scale_rule, depth=int(self.depth),
            repeats=int(self.repeats), batch_size=int(self.batch_size), seed=int(self.seed),
            lambda_max=self.lambda_max, num_params=self.num_params,
        )
        meta = merge_extra_meta(meta, extra_meta)
        tensors = {"lissa::resolved": torch.tensor([self.damping, self.scale], dtype=torch.float64)}
        atomic_save(Path(directory), tensors, meta)
        self.meta = meta
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "LissaSolver":
        meta, _tensors = _read(directory, "lissa")
        try:
            return cls(
                curvature=check_curvature(str(meta["curvature"])),
                damping=float(meta["damping"]),
                damping_rule=meta["damping_rule"],
                scale=float(meta["scale"]),
                scale_rule=meta["scale_rule"],
                depth=int(meta["depth"]),
                repeats=int(meta["repeats"]),
                batch_size=int(meta["batch_size"]),
                seed=int(meta["seed"]),
                num_examples=int(meta["num_examples"]),
                modules_info=_modules_info(meta),
                lambda_max=meta.get("lambda_max"),
                meta=meta,
            )
        except (KeyError, TypeError, ValueError, InfluenceError) as exc:
            raise FactorsError(
                f"factors at {directory} are incomplete or inconsistent ({exc}); re-run fit-factors"
            ) from None


def _trace_estimate(model, layout, loader, dev, curvature, seed, on_batch) -> tuple[float, int]:
    """trace(K) (mean over the data) and N: exact for GN (Σ of squared pseudo-gradient
    norms, no P² memory), Hutchinson with Rademacher probes for the Hessian."""
    total = 0
    trace = 0.0
    if curvature == "gauss_newton":
        for n, classes, layers in pseudo_gradient_batches(model, layout.modules, iterate_batches(loader, dev)):
            for batch in layers.values():
                if batch.positions == 1:
                    trace += float((batch.a[:, 0].square().sum(1) * batch.g[:, 0].square().sum(1)).sum())
                else:
                    step = max(1, _ROW_ELEMENTS // (batch.a.shape[2] * batch.g.shape[2]))
                    for s in range(0, batch.n, step):
                        grads = torch.bmm(batch.g[s : s + step].transpose(1, 2), batch.a[s : s + step])
                        trace += float(grads.square().sum())
            total += n
            if on_batch is not None:
                on_batch("trace", n)
        return trace / max(total, 1), total
    products = CurvatureProducts(model, layout, curvature)
    dtype = next(iter(products.tracked.values())).dtype
    gen = torch.Generator().manual_seed(int(seed))
    probes = (torch.randint(0, 2, (_HUTCHINSON_PROBES, layout.size), generator=gen) * 2 - 1).to(dev, dtype)
    for x, y in iterate_batches(loader, dev):
        trace += float((products.product(x, y, probes) * probes).sum()) / _HUTCHINSON_PROBES
        total += int(y.shape[0])
        if on_batch is not None:
            on_batch("trace", int(y.shape[0]))
    return trace / max(total, 1), total


def _top_eigenvalue(model, layout, loader, dev, curvature, seed, on_batch) -> float:
    """|λ|_max of the full-data curvature by power iteration (one data pass per step)."""
    products = CurvatureProducts(model, layout, curvature)
    dtype = next(iter(products.tracked.values())).dtype
    gen = torch.Generator().manual_seed(int(seed) + 12345)
    v = torch.randn(1, layout.size, generator=gen, dtype=torch.float64).to(dev, dtype)
    v /= v.norm()
    value = 0.0
    for _ in range(_POWER_ITERATIONS):
        w = torch.zeros_like(v)
        count = 0
        for x, y in iterate_batches(loader, dev):
            w += products.product(x, y, v)
            count += int(y.shape[0])
        w /= max(count, 1)
        new = float(w.norm())
        if new == 0.0 or not math.isfinite(new):
            return new
        v = w / new
        if on_batch is not None:
            on_batch("power-iteration", 1)
        if abs(new - value) <= 1e-5 * new:
            return new
        value = new
    return value


def fit_lissa(
    model: nn.Module,
    loader: Iterable,
    *,
    modules: list[str] | dict[str, nn.Module] | None = None,
    curvature: str = "gauss_newton",
    damping: str | float = "auto",
    damping_factor: float = SOLVER_DAMPING_FACTOR,
    depth: int = 3000,
    scale: str | float = "auto",
    repeats: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
    on_batch: ProgressCallback | None = None,
) -> LissaSolver:
    """Resolve LiSSA's parameters on the training data; returns a bound solver.

    damping "auto" = damping_factor (3) × trace(K)/P (as exact). scale "auto" =
    LISSA_SCALE_MARGIN × (λ_max + λ) with λ_max from a power iteration on the full
    data. depth: recursion steps per solve (each one minibatch product); convergence
    needs depth ≫ scale / (λ_min + λ). on_batch stages: "trace", "power-iteration".
    """
    check_curvature(curvature)
    _damping_value(damping, torch.ones(1), damping_factor)
    if int(depth) < 1 or int(repeats) < 1 or int(batch_size) < 1:
        raise InfluenceError("lissa: depth, repeats and batch_size must be positive integers")
    if not (scale == "auto" or (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0)):
        raise InfluenceError(f"lissa: scale must be 'auto' or a positive number, not {scale!r}")
    tracked = _tracked(model, modules)
    layout = ParameterLayout(tracked)
    dev = _prepare(model, device)
    with eval_mode(model):
        trace, total = _trace_estimate(model, layout, loader, dev, curvature, seed, on_batch)
        if total == 0:
            raise InfluenceError("the data loader yielded no examples")
        lam = _damping_value(damping, torch.tensor([trace / layout.size], dtype=torch.float64), damping_factor)
        lam_max = None
        if scale == "auto":
            lam_max = _top_eigenvalue(model, layout, loader, dev, curvature, seed, on_batch)
            resolved = LISSA_SCALE_MARGIN * (lam_max + lam)
        else:
            resolved = float(scale)
    solver = LissaSolver(
        curvature=curvature,
        damping=lam,
        damping_rule=damping,
        scale=float(resolved),
        scale_rule=scale,
        depth=int(depth),
        repeats=int(repeats),
        batch_size=int(batch_size),
        seed=int(seed),
        num_examples=total,
        modules_info=layout.info(),
        lambda_max=lam_max,
    )
    return solver.bind(model, loader, dev)


# ======================================================================= loading
def load_factors(directory: str | os.PathLike) -> Factors | ExactSolver | LissaSolver:
    """Whatever a strategy stored in ``directory`` (meta.json's strategy decides)."""
    meta = Factors.read_meta(directory)
    strategy = meta.get("strategy")
    if strategy == "exact":
        return ExactSolver.load(directory)
    if strategy == "lissa":
        return LissaSolver.load(directory)
    if strategy in STRATEGIES:
        return Factors.load(directory)
    raise FactorsError(
        f"factors at {Path(directory)} have unknown strategy {strategy!r}; re-run fit-factors"
    )
