"""The iterative solver behind the ``lissa`` strategy.

The stochastic Neumann-series recursion of Agarwal et al. (2017), as used by Koh & Liang
(2017): only curvature-vector products, any model size, but every solve costs
``depth × repeats`` minibatch products.
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

from influence_cli.engine.batching import ProgressCallback, iterate_batches, prepare_model
from influence_cli.engine.curvature import CurvatureProducts, check_curvature, top_eigenvalue, trace_estimate
from influence_cli.engine.damping import damping_value
from influence_cli.engine.losses import label_dtype
from influence_cli.engine.flat import (
    DENSE_DAMPING_FACTOR,
    FlatBound,
    ParameterLayout,
    layout_meta,
    modules_info,
    num_params as count_params,
    read_solver,
    solver_meta,
)
from influence_cli.engine.storage import atomic_save, inconsistent_factors, merge_extra_meta
from influence_cli.engine.tracked import check_tracked, eval_mode, tracked_modules
from influence_cli.errors import InfluenceError

__all__ = ["LissaSolver", "LissaDivergenceError", "fit_lissa", "LISSA_SCALE_MARGIN"]

# LiSSA scale = margin × (λ_max + λ) of the full-data curvature. The recursion contracts
# iff every minibatch eigenvalue μ̃ satisfies 0 < (μ̃ + λ)/scale < 2, so margin m
# tolerates minibatch top eigenvalues up to 2m·λ_max. On a trained digits MLP
# (64→128→10, 1,400 examples; scripts/solvers_digits.py) the top Gauss-Newton eigenvalue
# of 64-example minibatches measured 1.42 × the full-data one on average and 2.54 × at
# worst (20 batches), so 2 (tolerating 4×) leaves a factor ≈ 1.6 of slack; each doubling
# of the margin doubles the depth needed, so it is not set higher.
LISSA_SCALE_MARGIN = 2.0
# Divergence: a contracting recursion has ‖h_j‖ ≤ (j + 1)·‖v‖ (each Neumann term is at
# most ‖v‖); allow 10× that for minibatch noise. A blow-up by a factor r per step passes
# the bound after ~log(10 j)/log r steps (≈ 12 for r = 1.5, ≈ 50 for r = 1.1).
_DIVERGENCE_SLACK = 10.0


class LissaDivergenceError(InfluenceError):
    """The LiSSA recursion blew up: the scale is too small for the curvature."""


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
                    self.labels[idx].to(device=self.device, dtype=label_dtype(self.labels)),
                )


@dataclass
class LissaSolver:
    """(K + λI)⁻¹ by the LiSSA recursion, for a batch of vectors at once.

    h_0 = v; h_j = v + h_{j−1} − (K̃_j h_{j−1} + λ h_{j−1}) / scale with K̃_j the
    curvature of a fresh minibatch; estimate h_depth / scale, averaged over ``repeats``
    runs with seeds seed, seed + 1, .... Needs the model and training data:
    :meth:`attach` (done by fit_lissa, and by :meth:`bind` when the scoring loop passes
    its training loader).
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
        return count_params(self.modules_info)

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

    def bind(
        self, model: nn.Module, device: torch.device, *, loader: Any = None, on_batch: Any = None
    ) -> FlatBound:
        """This solver on ``model`` for the scoring loop. With ``loader`` (the training set
        the scoring functions are given) it is attached first, so a loaded solver needs
        nothing else; ``on_batch("lissa solves", rows)`` reports each finished chunk."""
        if loader is not None:
            self.attach(model, loader, device)
        self.on_vectors = on_batch
        return FlatBound(self, model, device)

    def attach(self, model: nn.Module, loader: Iterable, device: torch.device | str | None = None) -> "LissaSolver":
        """Attach the model and the training data the curvature products need;
        minibatches are drawn from ``loader``."""
        modules = self.check_model(model)
        dev = prepare_model(model, device)
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
            raise InfluenceError("LissaSolver needs the model and training data: call attach(model, loader) or bind(model, device, loader=loader)")
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
        meta = solver_meta("lissa", layout_meta(self.modules_info), self.num_examples, self.damping, self.damping_rule, self.curvature)
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
        meta, _tensors = read_solver(directory, "lissa")
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
                modules_info=modules_info(meta),
                lambda_max=meta.get("lambda_max"),
                meta=meta,
            )
        except (KeyError, TypeError, ValueError, InfluenceError) as exc:
            raise inconsistent_factors(directory, exc) from None


def fit_lissa(
    model: nn.Module,
    loader: Iterable,
    *,
    modules: list[str] | dict[str, nn.Module] | None = None,
    curvature: str = "gauss_newton",
    damping: str | float = "auto",
    damping_factor: float = DENSE_DAMPING_FACTOR,
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
    damping_value(damping, torch.ones(1), damping_factor)
    if int(depth) < 1 or int(repeats) < 1 or int(batch_size) < 1:
        raise InfluenceError("lissa: depth, repeats and batch_size must be positive integers")
    if not (scale == "auto" or (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0)):
        raise InfluenceError(f"lissa: scale must be 'auto' or a positive number, not {scale!r}")
    tracked = tracked_modules(model, modules)
    layout = ParameterLayout(tracked)
    dev = prepare_model(model, device)
    with eval_mode(model):
        trace, total = trace_estimate(model, layout, loader, dev, curvature, seed, on_batch)
        if total == 0:
            raise InfluenceError("the data loader yielded no examples")
        lam = damping_value(damping, torch.tensor([trace / layout.size], dtype=torch.float64), damping_factor)
        lam_max = None
        if scale == "auto":
            lam_max = top_eigenvalue(model, layout, loader, dev, curvature, seed, on_batch)
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
    return solver.attach(model, loader, dev)
