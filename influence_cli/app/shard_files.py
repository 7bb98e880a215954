"""``--shard i/n`` job-array runs (no process group) and ``infl merge``.

Each shard job handles the contiguous block ``shard_range(N, i, n)`` of the training set
and writes ``runs/<name>/shards/<stage>/<i>-of-<n>.safetensors`` plus a small
``<i>-of-<n>.json`` (stage, shard bounds, counts, and the checkpoint / influence hashes
it was computed with). ``infl merge`` checks that all n shards are present, were made
for the current config and checkpoint and cover [0, N) without gaps or overlaps, and
combines them into exactly the files a single run writes.

Stages:

- ``self-influence-<strategy>``: per-example self-influence of the block.
- ``score-<stem>``: the running top-k of each test row over the block (global indices).
- ``factors-<strategy>/covariance``: pass-1 sums Σ a aᵀ, Σ g gᵀ, counts (un-normalised).
  Merging adds them and eigendecomposes: kfac factors are then complete; for ekfac the
  merge writes ``factors-ekfac/bases.safetensors`` and asks for a second round.
- ``factors-<strategy>/eigenvalues``: pass-2 sums Σ_i (Q_Sᵀ G_i Q_A)² in the merged bases
  (ekfac round 2, or diagonal directly); merging gives the final factors.

So EK-FAC with job arrays is: ``fit-factors --shard i/n`` for every i, ``merge``, the
same ``fit-factors --shard i/n`` again (it finds the merged bases and runs pass 2),
``merge``. Sums are exact: the merged factors equal a single run up to float rounding.

This module: the shard file format (write, read, check) and the metadata each shard carries.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from influence_cli.distributed import shard_range
from influence_cli.errors import ShardError
from influence_cli.run import (
    atomic_path,
    atomic_write_json,
    hash_file,
    is_sealed,
    read_json,
    seal,
)

SHARD_FORMAT = 1


def shard_stem(index: int, count: int) -> str:
    return f"{index}-of-{count}"


def write_shard(directory: Path, index: int, count: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Tensors first, then the json (its presence marks a complete shard)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    stem = shard_stem(index, count)
    path = directory / f"{stem}.safetensors"
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    full = {"format": SHARD_FORMAT, "shard": index, "num_shards": count, "tensors_hash": hash_file(path), **meta}
    atomic_write_json(directory / f"{stem}.json", seal(full))  # sealed: a damaged json is refused
    return path


def _command(meta: dict[str, Any], index: int, count: int) -> str:
    return f"infl {meta.get('command', '<command>')} --shard {index}/{count}"


def read_shards(
    directory: Path, want: dict[str, Any], num_examples: int, *, command: str
) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Every shard of a stage, validated, in shard order; ShardError (one line) otherwise.

    want: meta keys that must match exactly (hashes, strategy, ...).
    """
    from safetensors.torch import load_file

    metas = sorted(directory.glob("*-of-*.json")) if directory.is_dir() else []
    if not metas:
        raise ShardError(f"{directory}: no shards to merge; run `infl {command} --shard i/n` for every i first")
    counts = {}
    for path in metas:
        meta = read_json(path)
        if meta is None or "num_shards" not in meta or not is_sealed(meta):
            raise ShardError(f"{path}: unreadable or damaged shard metadata; delete it and rerun that shard")
        counts.setdefault(int(meta["num_shards"]), path)
    if len(counts) > 1:
        listed = ", ".join(f"{n} ({p.name})" for n, p in sorted(counts.items()))
        raise ShardError(f"{directory}: shards of different splits ({listed}); delete the stale ones and rerun")
    (count,) = counts
    out = []
    for index in range(count):
        stem = shard_stem(index, count)
        meta_path = directory / f"{stem}.json"
        tensor_path = directory / f"{stem}.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise ShardError(
                f"missing shard {tensor_path}: run `infl {command} --shard {index}/{count}` then merge again"
            )
        meta = read_json(meta_path) or {}
        for key, value in want.items():
            if meta.get(key) != value:
                what = key.replace("_", " ")
                raise ShardError(
                    f"stale shard {tensor_path}: its {what} does not match the current config/checkpoint; "
                    f"rerun `{_command(meta, index, count)}` (or delete the shard)"
                )
        start, stop = shard_range(num_examples, index, count)
        if (meta.get("start"), meta.get("stop"), meta.get("num_examples")) != (start, stop, num_examples):
            raise ShardError(
                f"stale shard {tensor_path}: it covers examples [{meta.get('start')}, {meta.get('stop')}) of "
                f"{meta.get('num_examples')}, expected [{start}, {stop}) of {num_examples}; rerun `{_command(meta, index, count)}`"
            )
        if meta.get("tensors_hash") != hash_file(tensor_path):
            raise ShardError(f"corrupt shard {tensor_path}: its content does not match {meta_path.name}; rerun `{_command(meta, index, count)}`")
        try:
            tensors = load_file(str(tensor_path))
        except Exception as exc:  # safetensors' own errors
            raise ShardError(f"corrupt shard {tensor_path}: {exc}; rerun `{_command(meta, index, count)}`") from None
        out.append((meta, tensors))
    return out


def base_meta(session: Any, state: Any, strategy: str, stage: str, command: str, bounds: tuple[int, int]) -> dict[str, Any]:
    return {
        "stage": stage,
        "command": command,
        "strategy": strategy,
        "checkpoint_hash": state.checkpoint_hash,
        "influence_hash": session.influence_hash(strategy),
        "start": bounds[0],
        "stop": bounds[1],
        "num_examples": len(session.data().train),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def refuse_ensemble(session: Any) -> None:
    """Shard jobs score one model; an ensemble's members would each need their own shards."""
    size = session.config.influence.ensemble_size()
    if size > 1:
        raise ShardError(
            f"{session.config.source_file}: influence.ensemble: {size} cannot be combined with --shard/merge; "
            "run the ensemble in one process or under torchrun (or shard with influence.ensemble: 1)"
        )


def want_meta(session: Any, state: Any, strategy: str) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "checkpoint_hash": state.checkpoint_hash,
        "influence_hash": session.influence_hash(strategy),
    }
