"""What the stages write when the session is a ``--shard i/n`` job (``Session.shard``).

The stages themselves (app/factors.py ``ensure_factors``, app/scores.py
``run_self_influence``, app/explain.py ``run_score``) restrict the training rows to the
block; these functions turn their block result into a shard file (format: shard_files.py)
instead of the final output, and hold the fit-factors pass logic (which pass a job runs,
its sums, the merged pass-1 bases that `infl merge` writes between rounds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from influence_cli.app.shard_files import base_meta, want_meta, write_shard
from influence_cli.errors import ShardError
from influence_cli.run import hash_file, is_sealed, read_json

Bases = dict[str, tuple[torch.Tensor, ...]]


@dataclass
class ShardResult:
    """A stage's partial result for ``--shard i/n``: the shard file written."""

    path: Path
    which: Optional[str] = None  # fit-factors: the pass ("covariance" or "eigenvalues")


def require_shardable(strategy: str) -> None:
    """Only strategies whose fit is a sum over examples can be fitted in shards."""
    from influence_cli.engine import STRATEGIES

    spec = STRATEGIES.get(strategy)
    if spec is None or not (spec.shardable and spec.passes):
        shardable = ", ".join(name for name, cls in STRATEGIES.items() if cls.shardable and cls.passes)
        raise ShardError(f"--shard: strategy '{strategy}' is not fitted in shards (choose from {shardable}, or fit it without --shard)")


def bases_paths(session: Any, strategy: str) -> tuple[Path, Path]:
    root = session.run.shard_dir(f"factors-{strategy}")
    return root / "bases.safetensors", root / "bases.json"


def valid_bases(session: Any, state: Any, strategy: str) -> Optional[Bases]:
    """The merged pass-1 bases, when they exist and were made for this checkpoint and config."""
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


def factors_pass(session: Any, state: Any, strategy: str) -> tuple[str, Optional[Bases]]:
    """The pass this fit-factors job runs: pass-1 covariance sums, or (two-pass strategies,
    once `infl merge` has written valid bases; one-pass eigenvalue strategies always)
    pass-2 eigenvalue sums, with the bases they are taken in."""
    from influence_cli.engine import get_strategy

    passes = get_strategy(strategy).passes
    if passes[0] != "covariance":
        return "eigenvalues", None
    bases = valid_bases(session, state, strategy) if "eigenvalues" in passes else None
    return ("covariance", None) if bases is None else ("eigenvalues", bases)


def pass_sums(
    session: Any, model: Any, loader: Any, which: str, bases: Optional[Bases], on_batch: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One pass's un-normalised sums over the job's block: (tensors, counts)."""
    from influence_cli.engine import covariance_sums, eigenvalue_sums, select_modules
    from influence_cli.training import resolve_device

    config = session.config
    common = dict(
        fisher=config.influence.fisher, modules=config.influence.modules,
        device=resolve_device(config.influence.device), seed=session.model_seed, amp=config.influence.amp,
    )
    if which == "covariance":
        sums = covariance_sums(model, loader, on_batch=on_batch, **common)
        return sums.tensors(), sums.counts()
    if bases is None:
        qs = {name: (None, None) for name in select_modules(model, config.influence.modules)}
    else:
        qs = {n: (b[1], b[3]) for n, b in bases.items()}
    lam, total = eigenvalue_sums(model, loader, qs, on_batch=on_batch, **common)
    return {f"{n}::lam": v for n, v in lam.items()}, {"examples": total}


def write_factors_shard(
    session: Any, state: Any, strategy: str, which: str, bounds: tuple[int, int],
    tensors: dict[str, torch.Tensor], counts: dict[str, Any], with_bases: bool,
) -> ShardResult:
    stage = f"factors-{strategy}/{which}"
    meta = base_meta(session, state, strategy, stage, "fit-factors", bounds)
    meta["counts"] = counts
    if with_bases:
        meta["bases_hash"] = hash_file(bases_paths(session, strategy)[0])
    return ShardResult(_write(session, stage, tensors, meta), which)


def write_self_influence_shard(
    session: Any, state: Any, strategy: str, bounds: tuple[int, int], scores: Any
) -> ShardResult:
    """The block's self-influence (float64, in training order)."""
    stage = f"self-influence-{strategy}"
    meta = base_meta(session, state, strategy, stage, "self-influence", bounds)
    values = torch.as_tensor(scores, dtype=torch.float64)
    return ShardResult(_write(session, stage, {"self_influence": values}, meta))


def write_score_shard(
    session: Any, state: Any, strategy: str, bounds: tuple[int, int], csv_path: Path, result: Any, *,
    top: int, measurement: str, out: Optional[Path],
) -> ShardResult:
    """The block's top-k per test row (global training indices) and what merge needs to finish."""
    stage = f"score-{Path(csv_path).stem}"
    meta = base_meta(session, state, strategy, stage, f"score {csv_path}", bounds)
    meta.update(
        {
            "test_csv": str(Path(csv_path).resolve()),
            "test_csv_hash": hash_file(Path(csv_path)),
            "top": top,
            "measurement": measurement,
            "out": None if out is None else str(out),
        }
    )
    if session.config.influence.query_rank:  # shards of another rank are not mergeable
        meta["query_rank"] = session.config.influence.query_rank
    tensors = {
        "proponent_scores": result.proponent_scores, "proponent_indices": result.proponent_indices,
        "opponent_scores": result.opponent_scores, "opponent_indices": result.opponent_indices,
    }
    return ShardResult(_write(session, stage, tensors, meta))


def _write(session: Any, stage: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    shard = session.shard
    return write_shard(session.run.shard_dir(stage), shard.index, shard.count, tensors, meta)
