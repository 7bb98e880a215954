"""``--shard i/n`` jobs: each writes the partial result of its block of the training set (format in shard_files.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from influence_cli.app.choice import resolve_strategy
from influence_cli.app.shard_files import (
    base_meta,
    refuse_ensemble,
    want_meta,
    write_shard,
)
from influence_cli.errors import ShardError
from influence_cli.run import (
    hash_file,
    is_sealed,
    read_json,
)


def self_influence_shard(session: Any, index: int, count: int, strategy: Optional[str] = None) -> Path:
    """``infl self-influence --shard i/n``: needs valid stored factors."""
    refuse_ensemble(session)
    from influence_cli.app import (
        ensure_model,
        existing_factors,
        self_influence_scores,
        shard_bounds,
    )

    strategy = resolve_strategy(session, strategy)
    state = ensure_model(session)
    factors = existing_factors(session, state, strategy, "self-influence")
    bounds = shard_bounds(session, (index, count))
    if session.config.audit.score == "self_influence":
        tensors = {"self_influence": self_influence_scores(session, state.model, factors, shard=(index, count)).double()}
    else:  # the other audit.score values need every mislabel term (engine.mislabel)
        from influence_cli.app.scores import mislabel_terms_block

        terms = mislabel_terms_block(session, state.model, factors, shard=(index, count))
        tensors = {k: v.double() if v.is_floating_point() else v for k, v in terms.items()}
    stage = f"self-influence-{strategy}"
    meta = base_meta(session, state, strategy, stage, "self-influence", bounds)
    return write_shard(session.run.shard_dir(stage), index, count, tensors, meta)


def score_shard(
    session: Any, csv_path: Path, index: int, count: int, *, top: int, strategy: Optional[str], measurement: str,
    out: Optional[Path],
) -> Path:
    """``infl score TEST.csv --shard i/n``: the block's top-k per test row."""
    refuse_ensemble(session)
    from influence_cli.app import (
        Member,
        predict_queries,
        ensure_model,
        existing_factors,
        pairwise_block,
        shard_bounds,
    )
    from influence_cli.data.queries import read_query_rows

    strategy = resolve_strategy(session, strategy)
    data = session.data()
    queries = read_query_rows(Path(csv_path), session.config, data)
    state = ensure_model(session)
    factors = existing_factors(session, state, strategy, "score")
    predicted = torch.as_tensor(predict_queries([Member(session, state)], queries.inputs))
    labels = queries.labels
    measured = torch.where(labels >= 0, labels, predicted)
    k = min(top, len(data.train))
    bounds = shard_bounds(session, (index, count))
    result = pairwise_block(
        session, state.model, factors, queries.inputs, measured, measurement=measurement, top=k, shard=(index, count)
    )
    stage = f"score-{Path(csv_path).stem}"
    meta = base_meta(session, state, strategy, stage, f"score {csv_path}", bounds)
    meta.update(
        {
            "test_csv": str(Path(csv_path).resolve()),
            "test_csv_hash": hash_file(Path(csv_path)),
            "top": k,
            "measurement": measurement,
            "out": None if out is None else str(out),
        }
    )
    tensors = {
        "proponent_scores": result.proponent_scores, "proponent_indices": result.proponent_indices,
        "opponent_scores": result.opponent_scores, "opponent_indices": result.opponent_indices,
    }
    return write_shard(session.run.shard_dir(stage), index, count, tensors, meta)


def bases_paths(session: Any, strategy: str) -> tuple[Path, Path]:
    root = session.run.shard_dir(f"factors-{strategy}")
    return root / "bases.safetensors", root / "bases.json"


def valid_bases(session: Any, state: Any, strategy: str) -> Optional[dict[str, tuple[torch.Tensor, ...]]]:
    from safetensors.torch import load_file

    path, meta_path = bases_paths(session, strategy)
    meta = read_json(meta_path)
    if meta is None or not is_sealed(meta) or not path.is_file():
        return None
    if any(meta.get(k) != v for k, v in want_meta(session, state, strategy).items()):
        return None
    if meta.get("tensors_hash") != hash_file(path):
        return None
    tensors = load_file(str(path))
    names = sorted({k.rsplit("::", 1)[0] for k in tensors})
    return {n: tuple(tensors[f"{n}::{w}"] for w in ("l_s", "q_s", "l_a", "q_a")) for n in names}


def fit_factors_shard(session: Any, index: int, count: int, strategy: Optional[str] = None) -> tuple[str, Path]:
    """``infl fit-factors --shard i/n``: pass-1 sums, or pass-2 sums once merged bases exist.

    Returns (which pass, the shard file).
    """
    refuse_ensemble(session)
    from influence_cli.app import (
        ensure_model,
        influence_device,
        shard_bounds,
        train_loader,
        with_batch_backoff,
    )
    from influence_cli.engine import STRATEGIES, covariance_sums, eigenvalue_sums

    config = session.config
    strategy = resolve_strategy(session, strategy)
    spec = STRATEGIES.get(strategy)
    if spec is None or not (spec.shardable and spec.passes):
        shardable = ", ".join(name for name, cls in STRATEGIES.items() if cls.shardable and cls.passes)
        raise ShardError(f"--shard: strategy '{strategy}' is not fitted in shards (choose from {shardable}, or fit it without --shard)")
    state = ensure_model(session)
    bounds = shard_bounds(session, (index, count))
    passes = spec.passes
    common = dict(
        fisher=config.influence.fisher, modules=config.influence.modules, device=influence_device(config),
        seed=config.seed, amp=config.influence.amp,
    )
    bases = None
    if passes[0] == "covariance":
        bases = valid_bases(session, state, strategy) if "eigenvalues" in passes else None
        which = "covariance" if bases is None else "eigenvalues"
    else:
        which = "eigenvalues"
    stage = f"factors-{strategy}/{which}"
    meta = base_meta(session, state, strategy, stage, "fit-factors", bounds)

    def run(batch_size: int) -> dict[str, torch.Tensor]:
        loader = train_loader(session, batch_size, bounds)
        with session.reporter.stages(bounds[1] - bounds[0]) as on_batch:
            if which == "covariance":
                sums = covariance_sums(state.model, loader, on_batch=on_batch, **common)
                meta["counts"] = sums.counts()
                return sums.tensors()
            qs = {n: (b[1], b[3]) for n, b in bases.items()} if bases is not None else _identity_bases(state.model, config)
            lam, total = eigenvalue_sums(state.model, loader, qs, on_batch=on_batch, **common)
            meta["counts"] = {"examples": total}
            return {f"{n}::lam": v for n, v in lam.items()}

    tensors = with_batch_backoff(session, "fit-factors", run)
    state.model.cpu()
    if bases is not None:
        meta["bases_hash"] = hash_file(bases_paths(session, strategy)[0])
    return which, write_shard(session.run.shard_dir(stage), index, count, tensors, meta)


def _identity_bases(model: Any, config: Any) -> dict[str, tuple[None, None]]:
    from influence_cli.engine import select_modules

    return {name: (None, None) for name in select_modules(model, config.influence.modules)}
