"""``infl merge``: combine every stage's ``--shard i/n`` partial results into the files a single run writes.

The endings are the stages' own: ``finish_self_influence`` ranks and writes the CSVs,
``write_score_table`` the score CSV, ``Factors.save`` the factors (settings from
``fit_settings``), so a merged run and a single one cannot drift apart.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from influence_cli.app.explain import scores_target, write_score_table
from influence_cli.app.factors import FactorsState, existing_factors, fit_settings
from influence_cli.app.model import Member, ensure_model
from influence_cli.app.scores import finish_self_influence, merge_top, predict_queries
from influence_cli.app.shard_files import read_shards, refuse_ensemble, want_meta
from influence_cli.app.shards import bases_paths, valid_bases
from influence_cli.errors import ShardError
from influence_cli.run import (
    atomic_path,
    atomic_write_json,
    hash_file,
    read_json,
    seal,
)


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
    start = time.perf_counter()
    directory = session.run.shard_dir(f"self-influence-{strategy}")
    shards = read_shards(directory, want_meta(session, state, strategy), n, command="self-influence")
    scores = torch.cat([t["self_influence"] for _m, t in shards])
    factors = existing_factors(session, state, strategy, "merge")
    fstate = FactorsState(factors, True, 0.0, session.run.factors_dir(strategy))
    result = finish_self_influence(session, scores.double().numpy(), [Member(session, state)], [fstate], strategy, start)
    return {"stage": f"self-influence-{strategy}", "shards": len(shards), "result": result,
            "outputs": [session.run.self_influence_csv, session.run.mislabels_csv]}


def _merge_score(session: Any, state: Any, stage: str, n: int) -> dict[str, Any]:
    from influence_cli.data.queries import read_query_rows
    from influence_cli.engine import TopInfluences

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
                     "out": first.get("out"), "query_rank": session.config.influence.query_rank or None})
    shards = read_shards(directory, want, n, command=f"score {first.get('test_csv') if first else 'TEST.csv'}")
    meta = shards[0][0]
    parts = [TopInfluences(t["proponent_scores"], t["proponent_indices"], t["opponent_scores"], t["opponent_indices"])
             for _m, t in shards]
    merged = merge_top(parts, int(meta["top"]))
    csv_path = Path(meta["test_csv"])
    queries = read_query_rows(csv_path, session.config, session.data())
    predicted = predict_queries([Member(session, state)], queries.inputs)
    target = scores_target(session, csv_path, meta.get("out") or None)
    table = write_score_table(session, queries, predicted, merged, target)
    return {"stage": stage, "shards": len(shards), "table": table, "outputs": [target]}


def _merge_factors(session: Any, state: Any, strategy: str, n: int) -> dict[str, Any]:
    """Pass-1 shards: add the covariances (one-pass strategies: the factors; two-pass: the
    bases for round 2). Pass-2 shards: add the eigenvalues in the merged bases: the factors."""
    from influence_cli.engine import STRATEGIES, CovarianceSums, bases_from_covariances

    spec = STRATEGIES.get(strategy)
    if spec is None or not spec.shardable:
        raise ShardError(f"factors-{strategy}: strategy '{strategy}' is not fitted in shards")
    passes = spec.passes
    root = session.run.shard_dir(f"factors-{strategy}")
    want = want_meta(session, state, strategy)
    if "eigenvalues" in passes and any((root / "eigenvalues").glob("*-of-*.json")):
        bases = None
        if passes[0] == "covariance":
            bases = valid_bases(session, state, strategy)
            if bases is None:
                raise ShardError(f"{root / 'bases.safetensors'}: merged pass-1 bases are missing or stale; "
                                 "merge the covariance shards first (rerun `infl fit-factors --shard i/n`, then `infl merge`)")
            want = {**want, "bases_hash": hash_file(bases_paths(session, strategy)[0])}
        shards = read_shards(root / "eigenvalues", want, n, command="fit-factors")
        names = sorted({k.rsplit("::", 1)[0] for k in shards[0][1]})
        sums = {name: sum(t[f"{name}::lam"].double() for _m, t in shards) for name in names}
        total = sum(int(m["counts"]["examples"]) for m, _t in shards)
        return _save_merged(session, state, strategy, len(shards), eigenvalues=(sums, total), bases=bases)
    shards = read_shards(root / "covariance", want, n, command="fit-factors")
    covariance = None
    for meta, tensors in shards:
        part = CovarianceSums.from_parts(tensors, meta["counts"])
        covariance = part if covariance is None else covariance + part
    assert covariance is not None
    if "eigenvalues" not in passes:  # pass 1 was the last: the merged covariances are the factors
        return _save_merged(session, state, strategy, len(shards), covariance=covariance)
    bases = bases_from_covariances(covariance)
    path, meta_path = bases_paths(session, strategy)
    tensors = {}
    for name, (l_s, q_s, l_a, q_a) in bases.items():
        tensors.update({f"{name}::l_s": l_s, f"{name}::q_s": q_s, f"{name}::l_a": l_a, f"{name}::q_a": q_a})
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    atomic_write_json(meta_path, seal({**want, "tensors_hash": hash_file(path), "examples": covariance.examples}))
    return {"stage": f"factors-{strategy}", "shards": len(shards), "outputs": [path], "done": False,
            "next": f"pass 1 merged; now run every `infl fit-factors --shard i/{len(shards)}` again (pass 2), then `infl merge`"}


def _save_merged(session: Any, state: Any, strategy: str, count: int, **sums: Any) -> dict[str, Any]:
    """The merged sums as factors, saved where a single fit saves them."""
    from influence_cli.engine import factors_from_sums

    config = session.config
    factors = factors_from_sums(
        state.model, strategy, fisher=config.influence.fisher, modules=config.influence.modules,
        **sums, **fit_settings(session, state, strategy),
    )
    extra = {**session.factors_want(state, strategy), "config_name": config.name, "fit_seconds": None,
             "merged_shards": count}
    directory = session.run.factors_dir(strategy)
    factors.save(directory, extra_meta=extra)
    return {"stage": f"factors-{strategy}", "shards": count, "outputs": [directory], "done": True}
