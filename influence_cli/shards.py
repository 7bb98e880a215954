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
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch

from influence_cli.distributed import shard_range
from influence_cli.errors import ShardError
from influence_cli.run import atomic_path, atomic_write_json, hash_file, is_sealed, read_json, seal

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


# ---------------------------------------------------------------------- stages
def self_influence_shard(session: Any, index: int, count: int, strategy: Optional[str] = None) -> Path:
    """``infl self-influence --shard i/n``: needs valid stored factors."""
    refuse_ensemble(session)
    from influence_cli.app import ensure_model, existing_factors, self_influence_scores, shard_bounds

    strategy = strategy or session.config.influence.strategy
    state = ensure_model(session)
    factors = existing_factors(session, state, strategy, "self-influence")
    bounds = shard_bounds(session, (index, count))
    scores = self_influence_scores(session, state.model, factors, shard=(index, count))
    stage = f"self-influence-{strategy}"
    meta = base_meta(session, state, strategy, stage, "self-influence", bounds)
    return write_shard(session.run.shard_dir(stage), index, count, {"self_influence": scores.double()}, meta)


def score_shard(
    session: Any, csv_path: Path, index: int, count: int, *, top: int, strategy: Optional[str], measurement: str,
    out: Optional[Path],
) -> Path:
    """``infl score TEST.csv --shard i/n``: the block's top-k per test row."""
    refuse_ensemble(session)
    from influence_cli.data.queries import read_query_rows
    from influence_cli.app import ensure_model, existing_factors, pairwise_block, shard_bounds

    strategy = strategy or session.config.influence.strategy
    data = session.data()
    queries = read_query_rows(Path(csv_path), session.config, data)
    state = ensure_model(session)
    factors = existing_factors(session, state, strategy, "score")
    with torch.no_grad():
        predicted = state.model(queries.inputs).argmax(1)
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


def _bases_paths(session: Any, strategy: str) -> tuple[Path, Path]:
    root = session.run.shard_dir(f"factors-{strategy}")
    return root / "bases.safetensors", root / "bases.json"


def _valid_bases(session: Any, state: Any, strategy: str) -> Optional[dict[str, tuple[torch.Tensor, ...]]]:
    from safetensors.torch import load_file

    path, meta_path = _bases_paths(session, strategy)
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
    from influence_cli.engine import STRATEGIES, covariance_sums, eigenvalue_sums
    from influence_cli.app import ensure_model, influence_device, shard_bounds, train_loader, with_batch_backoff

    config = session.config
    strategy = strategy or config.influence.strategy
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
        bases = _valid_bases(session, state, strategy) if "eigenvalues" in passes else None
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
        meta["bases_hash"] = hash_file(_bases_paths(session, strategy)[0])
    return which, write_shard(session.run.shard_dir(stage), index, count, tensors, meta)


def _identity_bases(model: Any, config: Any) -> dict[str, tuple[None, None]]:
    from influence_cli.engine import select_modules

    return {name: (None, None) for name in select_modules(model, config.influence.modules)}


# ---------------------------------------------------------------------- merge
def shard_stages(session: Any) -> list[str]:
    """Stages that have shard files, in merge order (factors first)."""
    root = session.run.root / "shards"
    if not root.is_dir():
        return []
    stages = []
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        if child.name.startswith("factors-"):
            if any(child.glob("*/*-of-*.json")):
                stages.insert(0, child.name)
        elif any(child.glob("*-of-*.json")):
            stages.append(child.name)
    return stages


def merge_stage(session: Any, stage: str) -> dict[str, Any]:
    """Combine one stage's shards into the normal outputs; returns what was done."""
    refuse_ensemble(session)
    from influence_cli.app import ensure_model

    state = ensure_model(session)
    n = len(session.data().train)
    if stage.startswith("factors-"):
        return _merge_factors(session, state, stage[len("factors-"):], n)
    if stage.startswith("self-influence-"):
        strategy = stage[len("self-influence-"):]
        return _merge_self_influence(session, state, strategy, n)
    if stage.startswith("score-"):
        return _merge_score(session, state, stage, n)
    raise ShardError(f"--stage {stage}: unknown stage (expected factors-<strategy>, self-influence-<strategy> or score-<stem>)")


def _merge_self_influence(session: Any, state: Any, strategy: str, n: int) -> dict[str, Any]:
    from influence_cli.app import Member, existing_factors, finish_self_influence

    start = time.perf_counter()
    directory = session.run.shard_dir(f"self-influence-{strategy}")
    shards = read_shards(directory, want_meta(session, state, strategy), n, command="self-influence")
    scores = torch.cat([t["self_influence"] for _m, t in shards])
    factors = existing_factors(session, state, strategy, "merge")
    from influence_cli.app import FactorsState

    fstate = FactorsState(factors, True, 0.0, session.run.factors_dir(strategy))
    result = finish_self_influence(session, scores.double().numpy(), [Member(session, state)], [fstate], strategy, start)
    return {"stage": f"self-influence-{strategy}", "shards": len(shards), "result": result,
            "outputs": [session.run.self_influence_csv, session.run.mislabels_csv]}


def _merge_score(session: Any, state: Any, stage: str, n: int) -> dict[str, Any]:
    from influence_cli.render.files import write_csv
    from influence_cli.data.queries import read_query_rows
    from influence_cli.engine import TopInfluences
    from influence_cli.app import score_rows, merge_top

    directory = session.run.shard_dir(stage)
    metas = sorted(directory.glob("*-of-*.json")) if directory.is_dir() else []
    first = read_json(metas[0]) if metas else None
    strategy = (first or {}).get("strategy", session.config.influence.strategy)
    want = want_meta(session, state, strategy)
    if first:
        csv = Path(first.get("test_csv", ""))
        if not csv.is_file():
            raise ShardError(f"{metas[0]}: its test CSV {csv} is gone; rerun the score shards")
        want.update({"test_csv_hash": hash_file(csv), "top": first.get("top"), "measurement": first.get("measurement"),
                     "out": first.get("out")})
    shards = read_shards(directory, want, n, command=f"score {first.get('test_csv') if first else 'TEST.csv'}")
    meta = shards[0][0]
    parts = [TopInfluences(t["proponent_scores"], t["proponent_indices"], t["opponent_scores"], t["opponent_indices"])
             for _m, t in shards]
    merged = merge_top(parts, int(meta["top"]))
    data = session.data()
    csv_path = Path(meta["test_csv"])
    queries = read_query_rows(csv_path, session.config, data)
    with torch.no_grad():
        predicted = state.model(queries.inputs).argmax(1).numpy()
    table = score_rows(
        queries, predicted, merged.proponent_scores.double().numpy(), merged.proponent_indices.numpy(),
        merged.opponent_scores.double().numpy(), merged.opponent_indices.numpy(), data.train, list(data.class_names),
    )
    out = meta.get("out")
    target = Path(out) if out and out != "-" else session.run.scores_csv(csv_path.stem)
    write_csv(table, target)
    return {"stage": stage, "shards": len(shards), "table": table, "outputs": [target]}


def _merge_factors(session: Any, state: Any, strategy: str, n: int) -> dict[str, Any]:
    from safetensors.torch import save_file

    from influence_cli.engine import STRATEGIES, CovarianceSums, bases_from_covariances, factors_from_sums
    from influence_cli.app import influence_dtype

    config = session.config
    spec = STRATEGIES.get(strategy)
    if spec is None or not spec.shardable:
        raise ShardError(f"factors-{strategy}: strategy '{strategy}' is not fitted in shards")
    passes = spec.passes
    root = session.run.shard_dir(f"factors-{strategy}")
    want = want_meta(session, state, strategy)
    common = dict(damping=config.influence.damping, fisher=config.influence.fisher, modules=config.influence.modules,
                  dtype=influence_dtype(config), damping_factor=config.influence.damping_factor,
                  damping_scope=config.influence.damping_scope, options=config.influence.strategy_options(strategy))
    extra = {"checkpoint_hash": state.checkpoint_hash, "influence_hash": want["influence_hash"],
             "data": session.data().data_identity(), "config_name": config.name,
             "fit_seconds": None, "merged_shards": None}
    eig_dir = root / "eigenvalues"
    bases = None
    if "eigenvalues" in passes and any(eig_dir.glob("*-of-*.json")):
        if passes[0] == "covariance":
            bases = _valid_bases(session, state, strategy)
            if bases is None:
                raise ShardError(f"{root / 'bases.safetensors'}: merged pass-1 bases are missing or stale; "
                                 "merge the covariance shards first (rerun `infl fit-factors --shard i/n`, then `infl merge`)")
            want = {**want, "bases_hash": hash_file(_bases_paths(session, strategy)[0])}
        shards = read_shards(eig_dir, want, n, command="fit-factors")
        names = sorted({k.rsplit("::", 1)[0] for k in shards[0][1]})
        sums = {name: sum(t[f"{name}::lam"].double() for _m, t in shards) for name in names}
        total = sum(int(m["counts"]["examples"]) for m, _t in shards)
        factors = factors_from_sums(state.model, strategy, eigenvalues=(sums, total), bases=bases, **common)
        extra["merged_shards"] = len(shards)
        directory = session.run.factors_dir(strategy)
        factors.save(directory, extra_meta=extra)
        return {"stage": f"factors-{strategy}", "shards": len(shards), "outputs": [directory], "done": True}
    shards = read_shards(root / "covariance", want, n, command="fit-factors")
    sums = None
    for meta, tensors in shards:
        part = CovarianceSums.from_parts(tensors, meta["counts"])
        sums = part if sums is None else sums + part
    assert sums is not None
    if "eigenvalues" not in passes:  # pass 1 was the last: the merged covariances are the factors
        factors = factors_from_sums(state.model, strategy, covariance=sums, **common)
        extra["merged_shards"] = len(shards)
        directory = session.run.factors_dir(strategy)
        factors.save(directory, extra_meta=extra)
        return {"stage": f"factors-{strategy}", "shards": len(shards), "outputs": [directory], "done": True}
    bases = bases_from_covariances(sums)
    path, meta_path = _bases_paths(session, strategy)
    tensors = {}
    for name, (l_s, q_s, l_a, q_a) in bases.items():
        tensors.update({f"{name}::l_s": l_s, f"{name}::q_s": q_s, f"{name}::l_a": l_a, f"{name}::q_a": q_a})
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    atomic_write_json(meta_path, seal({**want, "tensors_hash": hash_file(path), "examples": sums.examples}))
    return {"stage": f"factors-{strategy}", "shards": len(shards), "outputs": [path], "done": False,
            "next": f"pass 1 merged; now run every `infl fit-factors --shard i/{len(shards)}` again (pass 2), then `infl merge`"}
