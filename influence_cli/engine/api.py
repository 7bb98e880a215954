"""The engine's front door: fit a strategy by name, load whatever a directory holds,
and build block factors from merged ``--shard`` sums."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from influence_cli.engine.batching import ProgressCallback
from influence_cli.engine.blockfit import MergedSums, factors_from_merged
from influence_cli.engine.factors import Factors
from influence_cli.engine.fitting import DEFAULT_CACHE_BYTES
from influence_cli.engine.passes import CovarianceSums
from influence_cli.engine.storage import read_meta
from influence_cli.engine.strategy import STRATEGIES, BlockStrategy, FitRequest, get_strategy
from influence_cli.errors import FactorsError, InfluenceError

__all__ = ["fit_factors", "load_factors", "factors_from_sums"]


def fit_factors(
    model: nn.Module,
    loader: Iterable,
    strategy: str = "ekfac",
    *,
    damping: str | float = "auto",
    fisher: str = "true",
    modules: list[str] | dict[str, nn.Module] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    on_batch: ProgressCallback | None = None,
    reference: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    damping_factor: float | None = None,
    damping_scope: str = "global",
    dist: Any = None,
    amp: str | None = None,
    options: Any = None,
) -> Any:
    """Fit ``strategy`` (a registered name) on ``loader``; returns its preconditioner:
    ``Factors`` for the block strategies, ``ExactSolver`` / ``LissaSolver`` for exact /
    lissa — every one has ``save``, ``check_model`` and ``bind`` for the scoring functions.

    options: the strategy's own settings, a dict or its ``options_type`` instance
        (e.g. {"max_params": 50000} for exact, {"depth": 2000, "scale": 50.0} for lissa).
    loader: iterable of batches: (inputs, labels[, index]) or dicts with 'labels' (and
        'attention_mask' for padded sequences); see engine/batches.py.
    fisher: "true" samples labels from the model's predictive distribution (seeded,
        deterministic given ``seed`` and loader order); "empirical" uses the labels.
    modules: fnmatch patterns of module names (or a ready {name: module} dict); None
        tracks every Linear/Conv2d.
    damping: "auto" = damping_factor × the mean eigenvalue (None: the strategy's measured
        ``default_damping_factor``: 0.1, exact/lissa 3), or one positive number for every
        layer. damping_scope "layer": the mean of each layer's own Λ (each layer its own
        λ); "global": the mean over every tracked weight of every layer (one λ for all,
        as in H + λI over the whole parameter space).
    device: None = the model's device, "auto" = cuda if available; the model is moved there.
    dtype: storage dtype of the fitted tensors (accumulation is float32/64, eigh float64).
    on_batch(stage, n): progress callback after each batch (the strategy's ``passes``).
    reference: block strategies: use the slow explicit-G_i path in pass 2 (for tests).
    cache_bytes: ekfac keeps pass 1's captured (a, g) for pass 2 when they fit in this
        many bytes, saving a forward/backward over the data; 0 disables.
    dist: None, or a process-group context (``influence_cli.distributed.DistContext``:
        ``world_size``, ``rank``, ``all_reduce_sum``, ``broadcast``) for strategies with
        ``data_parallel``. Each rank passes a loader over its own disjoint shard; sums and
        counts are all-reduced before normalisation and the eigendecompositions are shared
        out by layer and broadcast, so every rank returns the factors of the whole set.
    amp: "bfloat16" / "float16" autocast the model's forward/backward of the block
        strategies; accumulation stays float32/64.
    """
    cls = get_strategy(strategy)
    instance = cls(options)
    request = FitRequest(
        model=model, loader=loader, damping=damping,
        damping_factor=cls.default_damping_factor if damping_factor is None else damping_factor,
        damping_scope=damping_scope, fisher=fisher, modules=modules, device=device, dtype=dtype, seed=seed,
        on_batch=on_batch, reference=reference, cache_bytes=cache_bytes,
        dist=dist if cls.data_parallel else None, amp=amp,
    )
    return instance.fit(request)


def load_factors(directory: str | os.PathLike) -> Any:
    """Whatever a strategy stored in ``directory`` (meta.json's strategy decides)."""
    meta = read_meta(directory)
    cls = STRATEGIES.get(str(meta.get("strategy")))
    if cls is None:
        raise FactorsError(
            f"factors at {Path(directory)} have unknown strategy {meta.get('strategy')!r}; re-run fit-factors"
        )
    return cls.load(directory)


def factors_from_sums(
    model: nn.Module,
    strategy: str,
    *,
    covariance: CovarianceSums | None = None,
    eigenvalues: tuple[dict[str, Tensor], int] | None = None,
    bases: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] | None = None,
    num_examples: int | None = None,
    damping: str | float = "auto",
    fisher: str = "true",
    modules: Any = None,
    dtype: torch.dtype = torch.float32,
    damping_factor: float | None = None,
    damping_scope: str = "global",
    options: Any = None,
) -> Factors:
    """The Factors a single fit would give, from merged shard sums.

    ekfac: ``bases`` (from ``bases_from_covariances``) + merged ``eigenvalues``;
    kfac: ``covariance`` (or ``bases``); diagonal: ``eigenvalues``; identity: ``num_examples``.
    """
    cls = STRATEGIES.get(strategy)
    if cls is None or not (issubclass(cls, BlockStrategy) and cls.shardable):
        shardable = [n for n, c in STRATEGIES.items() if issubclass(c, BlockStrategy) and c.shardable]
        raise InfluenceError(f"strategy {strategy!r} cannot be fitted in shards (use one of {', '.join(shardable)})")
    return factors_from_merged(
        cls(options), model, MergedSums(covariance, bases, eigenvalues, num_examples), damping=damping,
        fisher=fisher, modules=modules, dtype=dtype, damping_factor=damping_factor, damping_scope=damping_scope,
    )
