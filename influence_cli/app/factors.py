"""The factors stage: reuse valid stored factors or fit them; batches, shards and out-of-memory back-off."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from influence_cli.app.model import Member
from influence_cli.app.session import ModelState, Session
from influence_cli.config import Config
from influence_cli.distributed import shard_range
from influence_cli.errors import CorruptFactorsError, FactorsError, InflError
from influence_cli.loaders import BatchLoader
from influence_cli.training import resolve_device


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or other device) out-of-memory, as raised by torch."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def with_batch_backoff(session: Session, stage: str, fn: Any) -> Any:
    """Call ``fn(batch_size)``; on out-of-memory halve the batch size and retry (down to 1).

    Results do not depend on the batch size (Fisher labels are drawn per example), so a
    retry gives the same numbers. Under torchrun each rank backs off on its own; an OOM
    on one rank only is not coordinated (set a smaller influence.batch_size instead).
    """
    batch_size = int(session.config.influence.batch_size)
    while True:
        try:
            return fn(batch_size)
        except Exception as exc:  # noqa: BLE001 - only OOM is retried
            if not is_out_of_memory(exc) or batch_size <= 1:
                raise
            batch_size = max(1, batch_size // 2)
            session.reporter.warn(f"{stage}: out of memory; retrying with batch size {batch_size}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def shard_bounds(session: Session) -> tuple[int, int]:
    """[start, stop) of the training examples this process handles: the block of a
    ``--shard i/n`` job (``session.shard``), else this torchrun rank's block, else everything."""
    n = len(session.data().train)
    shard = session.shard
    index, count = (shard.index, shard.count) if shard is not None else (session.dist.rank, session.dist.world_size)
    if count <= 1:
        return 0, n
    if n < count:
        raise InflError(f"{n} training examples cannot be split into {count} shards; use fewer processes or shards")
    return shard_range(n, index, count)


def train_loader(session: Session, batch_size: int, bounds: tuple[int, int]) -> BatchLoader:
    """Batches of the training examples in ``bounds``; batches carry global indices."""
    data = session.data()
    start, stop = bounds
    indices = None if (start, stop) == (0, len(data.train)) else torch.arange(start, stop)
    return BatchLoader(data.train, batch_size, indices=indices, num_workers=session.config.influence.num_workers)


def influence_device(config: Config) -> torch.device:
    return resolve_device(config.influence.device)


def influence_dtype(config: Config) -> torch.dtype:
    return torch.float64 if config.influence.dtype == "float64" else torch.float32


def stale_reason(directory: Any, want: dict[str, Any]) -> Optional[str]:
    """Why stored factors cannot be used, or None when they are valid."""
    from influence_cli.data.fingerprint import describe_change
    from influence_cli.engine import read_meta

    if not (directory / "meta.json").is_file():
        return "incomplete or unreadable factors"
    try:
        meta = read_meta(directory)
    except FactorsError as exc:
        return getattr(exc, "reason", None) or "incomplete or unreadable factors"
    stored = meta.get("data") if isinstance(meta.get("data"), dict) else None
    if "data" in want and (stored is None or stored.get("fingerprint") != want["data"]["fingerprint"]):
        return f"{describe_change(stored, want['data'])} since the factors were fitted"
    if meta.get("checkpoint_hash") != want["checkpoint_hash"]:
        return "factors were fitted for a different checkpoint"
    if meta.get("influence_hash") != want["influence_hash"]:
        return "factors were fitted with different data or influence settings"
    return None


@dataclass
class FactorsState:
    factors: Any
    reused: bool
    seconds: float
    directory: Any


def stored_factors(session: Session, directory: Any, want: dict[str, Any], *, refit_stale: bool) -> Optional[FactorsState]:
    """The stored factors when valid; None (said) when stale and ``refit_stale``, else FactorsError."""
    from influence_cli.engine import load_factors

    problem = stale_reason(directory, want)
    if problem is None:
        start = time.perf_counter()
        try:
            factors = load_factors(directory)  # verifies the tensors' sha256
        except CorruptFactorsError as exc:
            problem = exc.reason
        else:
            return FactorsState(factors, True, time.perf_counter() - start, directory)
    if not refit_stale:
        raise FactorsError(f"{directory}: {problem}; rerun with --overwrite to refit")
    session.reporter.info(f"factors in {directory}: {problem}; refitting")
    return None


def ensure_factors(
    session: Session, state: ModelState, strategy: str, *, overwrite: bool = False, refit_stale: bool = False
) -> Any:
    """Reuse valid stored factors or fit new ones (a FactorsState).

    Stale factors (another checkpoint, other data or influence settings) are never used:
    `infl fit-factors` refuses them unless ``overwrite``; the audit commands pass
    ``refit_stale`` and refit them, saying so, because their job is to audit the data as
    it is now (a CI check after a label change must not stop at a cache).
    A ``--shard i/n`` session fits its block's sums of one pass instead and returns the
    shard file written (a ShardResult); `infl merge` turns the shards into factors.
    """
    from influence_cli.engine import fit_factors, get_strategy, load_factors

    if session.shard is not None:
        return fit_factors_shard(session, state, strategy)
    config, run, reporter = session.config, session.run, session.reporter
    directory = run.factors_dir(strategy)
    want = session.factors_want(state, strategy)
    if directory.exists() and not overwrite:
        reused = stored_factors(session, directory, want, refit_stale=refit_stale)
        if reused is not None:
            return reused
    device = influence_device(config)
    dist = session.dist
    parallel = get_strategy(strategy).data_parallel
    if not parallel and dist.active and not dist.is_main:
        # Strategies without data parallelism fit on the whole training set: rank 0 fits
        # once, the others load it.
        dist.barrier()
        return FactorsState(load_factors(directory), False, 0.0, directory)
    bounds = shard_bounds(session) if parallel else (0, len(session.data().train))
    start = time.perf_counter()

    def fit(batch_size: int) -> Any:
        with reporter.stages(bounds[1] - bounds[0]) as on_batch:
            return fit_factors(
                state.model,
                train_loader(session, batch_size, bounds),
                strategy,
                fisher=config.influence.fisher,
                modules=config.influence.modules,
                device=device,
                seed=session.model_seed,
                on_batch=on_batch,
                dist=dist if dist.active and parallel else None,
                amp=config.influence.amp,
                **fit_settings(session, state, strategy),
            )

    factors = with_batch_backoff(session, "fit-factors", fit)
    seconds = time.perf_counter() - start
    if dist.is_main:
        run.ensure()
        factors.save(directory, extra_meta={**want, "config_name": config.name, "fit_seconds": seconds})
    else:
        factors.meta = {**factors._meta_dict(), **want}
    if dist.active:
        dist.barrier()
    state.model.cpu()
    return FactorsState(factors, False, seconds, directory)


def solver_options(config: Config, strategy: str) -> Optional[dict[str, Any]]:
    """The strategy's own settings, ``influence.<strategy>`` (None when it has none)."""
    return config.influence.strategy_options(strategy)


def fit_settings(session: Session, state: ModelState, strategy: str) -> dict[str, Any]:
    """What turns curvature sums into factors (damping, dtype, the strategy's options): one
    set for a single fit and `infl merge`, so merged factors are the single fit's."""
    config = session.config
    return dict(
        damping=config.influence.damping, dtype=influence_dtype(config), damping_factor=config.influence.damping_factor,
        damping_scope=config.influence.damping_scope, options=solver_options(config, strategy),
    )


def fit_factors_shard(session: Session, state: ModelState, strategy: str) -> Any:
    """``fit-factors --shard i/n``: one pass's sums over the block, as a shard file (pass 2
    once `infl merge` has written the pass-1 bases)."""
    from influence_cli.app.shards import factors_pass, pass_sums, require_shardable, write_factors_shard

    require_shardable(strategy)
    which, bases = factors_pass(session, state, strategy)
    bounds = shard_bounds(session)

    def run(batch_size: int) -> Any:
        with session.reporter.stages(bounds[1] - bounds[0]) as on_batch:
            return pass_sums(session, state.model, train_loader(session, batch_size, bounds), which, bases, on_batch)

    tensors, counts = with_batch_backoff(session, "fit-factors", run)
    state.model.cpu()
    return write_factors_shard(session, state, strategy, which, bounds, tensors, counts, with_bases=bases is not None)


def existing_factors(session: Session, state: ModelState, strategy: str, command: str) -> Any:
    """Stored factors that are valid for this checkpoint and config, or a one-line error
    (shard jobs and merge never fit factors themselves: n jobs would fit them n times)."""
    from influence_cli.engine import load_factors

    directory = session.run.factors_dir(strategy)
    want = session.factors_want(state, strategy)
    problem = stale_reason(directory, want) if directory.exists() else "no fitted factors"
    if problem is not None:
        raise FactorsError(
            f"{directory}: {problem}; {command} --shard needs them: run `infl fit-factors` "
            "(or its --shard jobs and `infl merge`) first"
        )
    return load_factors(directory)


def warn_solver_limits(session: Session, factors: Any, *, per_example: bool) -> None:
    """The strategy's own warnings (LiSSA: cost and convergence), said before the slow part."""
    from influence_cli.engine import strategy_warnings

    for message in strategy_warnings(factors, per_example=per_example):
        session.reporter.warn(message)


def members_factors(members: list[Member], strategy: str, command: str) -> list[FactorsState]:
    """Every member's valid factors (reused, or refitted when stale). A ``--shard`` job
    only uses stored ones: n jobs would fit them n times."""
    if members[0].session.shard is not None:
        return [
            FactorsState(existing_factors(m.session, m.state, strategy, command), True, 0.0, m.session.run.factors_dir(strategy))
            for m in members
        ]
    return [ensure_factors(m.session, m.state, strategy, refit_stale=True) for m in members]
