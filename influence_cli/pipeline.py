"""The stages behind every command: data → model → factors → scores → reports.

Each function does the earlier stages it needs when their outputs are missing, reuses
outputs that are still valid (by content hash) and never trusts stale ones. The CLI calls
exactly one of these per command and renders what it returns.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from influence_cli import __version__
from influence_cli.config import Config
from influence_cli.distributed import DistContext, current, shard_range
from influence_cli.errors import CorruptFactorsError, FactorsError, InflError
from influence_cli.loaders import BatchLoader
from influence_cli.models import build_model, check_model_fits, load_checkpoint, save_checkpoint
from influence_cli.progress import Reporter
from influence_cli.run import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    hash_file,
    hash_object,
    influence_hash,
    read_json,
    training_hash,
)
from influence_cli.training import accuracy, predict_probs, resolve_device, train_model


@dataclass
class ModelState:
    """A ready model plus what later stages need to know about it."""

    model: nn.Module
    checkpoint_hash: str
    trained_now: bool
    train_accuracy: float
    test_accuracy: float
    info: dict[str, Any] = field(default_factory=dict)
    # Softmax outputs on the train and test splits, computed once for the accuracies and
    # reused by the ranking (a second forward pass over the data costs as much again).
    probs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


@dataclass
class Session:
    """Everything loaded for one command: config, run directory, data, reporter.

    ``member`` k >= 1 is the k-th extra model of an ensemble (``influence.ensemble``): same
    data, its own seed (seed + k) or checkpoint, its own run directory.
    """

    config: Config
    reporter: Reporter
    run: RunDir = field(init=False)
    datasets: Any = None
    member: int = 0
    dist: DistContext = field(default_factory=current)

    def __post_init__(self) -> None:
        self.run = RunDir(self.config, self.member)

    @property
    def model_seed(self) -> int:
        """Seeds initial weights, shuffling and Fisher sampling (not the data split)."""
        return int(self.config.seed) + self.member

    def data(self) -> Any:
        if self.datasets is None:
            from influence_cli.data import build_datasets
            from influence_cli.data.cache import load_datasets

            self.datasets = load_datasets(
                self.config, self.run.root / "cache", build_datasets, write=self.dist.is_main
            )
        return self.datasets

    def data_fingerprint(self) -> str:
        """Content hash of the training split this command uses (cache keys include it)."""
        return self.data().fingerprint("train")

    def influence_hash(self, strategy: str) -> str:
        return influence_hash(self.config, strategy, self.data_fingerprint())

    def factors_want(self, state: "ModelState", strategy: str) -> dict[str, Any]:
        """What stored factors must have been fitted for: this checkpoint, settings and data."""
        return {
            "checkpoint_hash": state.checkpoint_hash,
            "influence_hash": self.influence_hash(strategy),
            "data": self.data().data_identity(),
        }


# ----------------------------------------------------------------------------- model


def member_checkpoint(config: Config, member: int) -> Optional[str]:
    """The user checkpoint of an ensemble member, or None when the member is trained."""
    if isinstance(config.influence.ensemble, list):
        return config.influence.ensemble[member]
    return config.model.checkpoint if member == 0 else None


def member_training_hash(config: Config, member: int, data_fingerprint: str) -> str:
    base = training_hash(config, data_fingerprint)
    return base if member == 0 else hash_object({"training_hash": base, "ensemble_member": member})


def ensemble_sessions(session: Session) -> list[Session]:
    """The sessions of every ensemble member (member 0 is ``session`` itself); they share
    the data and the reporter."""
    config = session.config
    size = config.influence.ensemble_size()
    if size > 1 and isinstance(config.influence.ensemble, int) and config.model.checkpoint:
        raise InflError(
            f"{config.source_file}: influence.ensemble: {size} trains {size} models, which cannot be combined "
            "with model.checkpoint; list the checkpoints instead (influence.ensemble: [a.pt, b.pt, ...])"
        )
    if session.member != 0:
        return [session]
    data = session.data()
    members = [session]
    for k in range(1, size):
        members.append(Session(config, session.reporter, datasets=data, member=k))
    return members


def ensure_model(session: Session, *, retrain: bool = False) -> ModelState:
    """Load the user's checkpoint, reuse a valid trained one, or train and save a new one.

    Under torchrun rank 0 trains (or verifies) first while the others wait, then they
    load the checkpoint it wrote: one training, one file.
    """
    dist = session.dist
    if dist.active and not dist.is_main:
        dist.barrier()
        return _ensure_model(session, retrain=False)
    state = _ensure_model(session, retrain=retrain)
    if dist.active:
        dist.barrier()
    return state


def _ensure_model(session: Session, *, retrain: bool = False) -> ModelState:
    config, run, reporter = session.config, session.run, session.reporter
    data = session.data()
    num_classes = len(data.class_names)
    model = build_model(config.model, tuple(data.input_shape), num_classes, seed=session.model_seed)
    check_model_fits(model, config.model, data.train.inputs[:2], num_classes)
    device = resolve_device(config.train.device)
    trained_now = False
    info: dict[str, Any] = {}
    user_checkpoint = member_checkpoint(config, session.member)
    if user_checkpoint:
        path = config.resolve_path(user_checkpoint)
        load_checkpoint(model, path)
        checkpoint_hash = hash_file(path)
        info["checkpoint"] = str(path)
    else:
        meta = read_json(run.train_meta)
        want = member_training_hash(config, session.member, data.fingerprint("train"))
        problem = None if retrain else checkpoint_problem(run, meta, want, data.data_identity())
        if problem is None and not retrain:
            load_checkpoint(model, run.checkpoint)
            checkpoint_hash = meta["checkpoint_hash"]  # type: ignore[index]
            info = dict(meta)  # type: ignore[arg-type]
        else:
            if not retrain and meta is not None and meta.get("training_hash") == want:
                what = "is missing" if not run.checkpoint.is_file() else (
                    f"is truncated, damaged or replaced (its hash does not match {run.train_meta.name})"
                )
                reporter.info(f"{run.checkpoint} {what}; training again")
            run.ensure()
            if problem is not None and meta is not None:
                reporter.info(f"checkpoint in {run.root}: {problem}; retraining")
            if session.member:
                reporter.info(f"ensemble: training member {session.member + 1} of {config.influence.ensemble_size()}")
            stats = train_model(
                model, data.train, config.train, seed=session.model_seed, device=device, reporter=reporter
            )
            model.cpu()
            save_checkpoint(model, run.checkpoint)
            checkpoint_hash = hash_file(run.checkpoint)
            trained_now = True
            info = {"training_hash": want, "checkpoint_hash": checkpoint_hash, "data": data.data_identity(), **stats}
    model.eval()
    train_probs = predict_probs(model, data.train)
    test_probs = predict_probs(model, data.test)
    train_acc = accuracy(train_probs, data.train.labels)
    test_acc = accuracy(test_probs, data.test.labels)
    if trained_now:
        info.update({"train_accuracy": train_acc, "test_accuracy": test_acc, "version": __version__})
        atomic_write_json(run.train_meta, info)
        atomic_write_text(run.resolved_config, config.to_replay_yaml())
    return ModelState(model, checkpoint_hash, trained_now, train_acc, test_acc, info,
                      probs={"train": train_probs, "test": test_probs})


def checkpoint_problem(run: RunDir, meta: Optional[dict[str, Any]], want: str, data: dict[str, Any]) -> Optional[str]:
    """Why the stored checkpoint cannot be reused, or None when it is valid."""
    from influence_cli.data.fingerprint import describe_change

    if meta is None or not run.checkpoint.is_file():
        return "no trained checkpoint"
    stored = meta.get("data") if isinstance(meta.get("data"), dict) else None
    if stored is None or stored.get("fingerprint") != data["fingerprint"]:
        return describe_change(stored, data)
    if meta.get("training_hash") != want:
        return "the data, model or train settings of the config changed"
    if meta.get("checkpoint_hash") != hash_file(run.checkpoint):
        return "the checkpoint file does not match train.json (edited or half-written)"
    return None


# ----------------------------------------------------------------------------- data shards


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


def shard_bounds(session: Session, shard: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    """[start, stop) of the training examples this process handles: a --shard i/n job's
    block, else this torchrun rank's block, else everything."""
    n = len(session.data().train)
    index, count = shard if shard is not None else (session.dist.rank, session.dist.world_size)
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


# ----------------------------------------------------------------------------- factors


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


def ensure_factors(
    session: Session, state: ModelState, strategy: str, *, overwrite: bool = False, refit_stale: bool = False
) -> FactorsState:
    """Reuse valid stored factors or fit new ones.

    Stale factors (another checkpoint, other data or influence settings) are never used:
    `infl fit-factors` refuses them unless ``overwrite``; the audit commands pass
    ``refit_stale`` and refit them, saying so, because their job is to audit the data as
    it is now (a CI check after a label change must not stop at a cache).
    """
    from influence_cli.engine import fit_factors, get_strategy, load_factors

    config, run, reporter = session.config, session.run, session.reporter
    directory = run.factors_dir(strategy)
    want = session.factors_want(state, strategy)
    if directory.exists() and not overwrite:
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
        reporter.info(f"factors in {directory}: {problem}; refitting")
    device = influence_device(config)
    dist = session.dist
    parallel = get_strategy(strategy).data_parallel
    options = solver_options(config, strategy)
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
                damping=config.influence.damping,
                fisher=config.influence.fisher,
                modules=config.influence.modules,
                device=device,
                dtype=influence_dtype(config),
                seed=session.model_seed,
                on_batch=on_batch,
                damping_factor=config.influence.damping_factor,
                damping_scope=config.influence.damping_scope,
                dist=dist if dist.active and parallel else None,
                amp=config.influence.amp,
                options=options,
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


def self_influence_scores(
    session: Session, model: nn.Module, factors: Any, *, shard: Optional[tuple[int, int]] = None
) -> torch.Tensor:
    """Self-influence of the training set: this rank's (or --shard job's) block, gathered
    over ranks in global index order. With ``shard`` only that block is returned."""
    from influence_cli.engine.scoring import self_influence

    config = session.config
    bounds = shard_bounds(session, shard)
    device = influence_device(config)

    def score(batch_size: int) -> torch.Tensor:
        with session.reporter.stages(bounds[1] - bounds[0]) as on_batch:
            return self_influence(
                model, factors, train_loader(session, batch_size, bounds), device=device,
                on_batch=on_batch, amp=config.influence.amp,
            )

    scores = with_batch_backoff(session, "self-influence", score).detach().cpu()
    model.cpu()
    if shard is None and session.dist.active:
        scores = session.dist.gather_cat(scores)
    return scores


# ----------------------------------------------------------------------------- self-influence


@dataclass
class SelfInfluenceResult:
    table: Any  # pandas DataFrame in the output contract's columns
    summary: dict[str, Any]
    seconds: float
    model_state: ModelState
    factors_state: FactorsState
    members: list[Any] = field(default_factory=list)


@dataclass
class Member:
    """One model of the ensemble (a plain run has exactly one)."""

    session: Session
    state: ModelState


def ensure_members(session: Session) -> list[Member]:
    """Every ensemble member's ready model (trained, reused or loaded)."""
    return [Member(s, ensure_model(s)) for s in ensemble_sessions(session)]


def warn_solver_limits(session: Session, factors: Any, *, per_example: bool) -> None:
    """The strategy's own warnings (LiSSA: cost and convergence), said before the slow part."""
    from influence_cli.engine import strategy_warnings

    for message in strategy_warnings(factors, per_example=per_example):
        session.reporter.warn(message)


def members_factors(members: list[Member], strategy: str) -> list[FactorsState]:
    """Every member's valid factors (reused, or refitted when stale)."""
    return [ensure_factors(m.session, m.state, strategy, refit_stale=True) for m in members]


def members_self_influence(
    members: list[Member], strategy: str, fstates: Optional[list[FactorsState]] = None
) -> tuple[np.ndarray, list[FactorsState]]:
    """Self-influence averaged over the ensemble members, float64, in training order
    (under torchrun each rank scores its block and every rank gets the whole vector).
    ``fstates``: the members' factors when the caller already holds them."""
    fstates = fstates or members_factors(members, strategy)
    total: Optional[np.ndarray] = None
    for member, fstate in zip(members, fstates):
        warn_solver_limits(member.session, fstate.factors, per_example=True)
        scores = self_influence_scores(member.session, member.state.model, fstate.factors)
        values = scores.double().numpy()
        total = values if total is None else total + values
    assert total is not None
    return total / len(members), fstates


def members_probs(members: list[Member], dataset: Any) -> np.ndarray:
    """Predicted class probabilities averaged over the members (float64)."""
    total = None
    for member in members:
        split = next((k for k in ("train", "test") if getattr(member.session.data(), k) is dataset), None)
        cached = member.state.probs.get(split) if split else None
        probs = (cached if cached is not None else predict_probs(member.state.model, dataset)).double().numpy()
        total = probs if total is None else total + probs
    return total / len(members)


def members_pairwise(
    members: list[Member],
    strategy: str,
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    measurement: str = "loss",
    top: Optional[int] = None,
    fstates: Optional[list[FactorsState]] = None,
) -> Any:
    """score(t, i) averaged over the ensemble: the (T, N) matrix, or TopInfluences when
    ``top`` is given. One member streams with a running top-k; an ensemble needs each
    member's full matrix (T × N floats) to average before ranking. Under torchrun every
    rank scores its block of training columns and the blocks are gathered."""
    from influence_cli.engine.scoring import TopInfluences

    fstates = fstates or members_factors(members, strategy)
    total = None
    for member, fstate in zip(members, fstates):
        session = member.session
        warn_solver_limits(session, fstate.factors, per_example=False)
        member_top = top if len(members) == 1 else None
        result = pairwise_block(
            session, member.state.model, fstate.factors, test_inputs, test_labels,
            measurement=measurement, top=member_top,
        )
        if session.dist.active:
            result = gather_scores(session.dist, result, member_top)
        if len(members) == 1:
            return result
        matrix = result.detach().cpu().double()
        total = matrix if total is None else total + matrix
    mean = total / len(members)
    if top is None:
        return mean
    k = min(int(top), mean.shape[1])
    best = torch.topk(mean, k, dim=1, largest=True, sorted=True)
    worst = torch.topk(mean, k, dim=1, largest=False, sorted=True)
    return TopInfluences(best.values, best.indices, worst.values, worst.indices)


class _TensorRows:
    """The minimal dataset view predict_probs needs for query rows."""

    def __init__(self, inputs: torch.Tensor):
        self.inputs = inputs
        self.labels = torch.zeros(len(inputs), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.inputs[i], self.labels[i], i


def run_self_influence(session: Session, strategy: Optional[str] = None) -> SelfInfluenceResult:
    """Self-influence of every training example, ranked and flagged; writes the CSVs
    (rank 0 only under torchrun).

    With an ensemble the scores and the predicted probabilities are averaged over members.
    """
    strategy = strategy or session.config.influence.strategy
    start = time.perf_counter()
    members = ensure_members(session)
    scores_np, fstates = members_self_influence(members, strategy)
    return finish_self_influence(session, scores_np, members, fstates, strategy, start)


def finish_self_influence(
    session: Session, scores: np.ndarray, members: list[Member], fstates: list[Any], strategy: str, start: float
) -> SelfInfluenceResult:
    """Rank, flag and write the CSVs (rank 0 only) from the self-influence of every example."""
    from influence_cli.audit.ranking import build_ranking, class_summary
    from influence_cli.render.files import write_csv, write_json

    config, run = session.config, session.run
    scores_np = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(scores_np)):
        raise InflError("self-influence produced non-finite values: set influence.damping to a larger number")
    data = session.data()
    probs = members_probs(members, data.train)
    table = build_ranking(
        scores_np, data.train.labels.numpy(), probs, list(data.train.ids), list(data.class_names), config.audit.flag
    )
    summary = class_summary(table, list(data.class_names))
    seconds = time.perf_counter() - start
    state = members[0].state
    summary["run"] = {
        "name": config.name,
        "strategy": strategy,
        "examples": int(len(table)),
        "flagged": int(table["flagged"].sum()),
        "seconds": round(seconds, 3),
        "train_accuracy": state.train_accuracy,
        "test_accuracy": state.test_accuracy,
        "flag_rule": config.audit.flag.model_dump(mode="json"),
    }
    if len(members) > 1:
        test_probs = members_probs(members, data.test)
        summary["run"]["ensemble"] = {
            "members": len(members),
            "train_accuracy": float((probs.argmax(1) == data.train.labels.numpy()).mean()),
            "test_accuracy": float((test_probs.argmax(1) == data.test.labels.numpy()).mean()),
            "member_test_accuracy": [m.state.test_accuracy for m in members],
        }
    if session.dist.is_main:
        run.ensure()
        write_csv(table, run.self_influence_csv)
        write_csv(table[table["flagged"]], run.mislabels_csv)
        write_json(summary, run.summary_json)
    return SelfInfluenceResult(table, summary, seconds, state, fstates[0], members)


# ----------------------------------------------------------------------------- scores

SCORE_COLUMNS = [
    "test_id", "test_index", "test_label", "test_predicted", "rank", "train_index", "train_id", "train_label", "influence",
    "role",
]


@dataclass
class ScoreResult:
    table: Any  # pandas DataFrame with SCORE_COLUMNS
    queries: Any  # QueryRows
    predicted: np.ndarray  # (T,) predicted class per test row
    measured: np.ndarray  # (T,) the label each row was measured against
    seconds: float
    model_state: ModelState
    strategy: str
    matrix_path: Optional[Any] = None


def _score_rows(
    queries: Any,
    predicted: np.ndarray,
    values_p: np.ndarray,
    index_p: np.ndarray,
    values_o: np.ndarray,
    index_o: np.ndarray,
    train: Any,
    class_names: list[str],
) -> Any:
    import pandas as pd

    labels = queries.labels.numpy()
    train_labels = train.labels.numpy()
    test_rows = getattr(queries, "indices", None)
    rows = []
    for t in range(len(queries.ids)):
        test_label = class_names[labels[t]] if labels[t] >= 0 else ""
        # test_index: the row of the test split the user asked for (an 'index' column), else empty
        test_index = int(test_rows[t]) if test_rows is not None else ""
        common = (queries.ids[t], test_index, test_label, class_names[int(predicted[t])])
        for role, values, indices, keep in (
            ("proponent", values_p[t], index_p[t], lambda v: v > 0),
            ("opponent", values_o[t], index_o[t], lambda v: v < 0),
        ):
            rank = 0
            for value, index in zip(values, indices):
                if not keep(value):
                    continue
                rank += 1
                rows.append(
                    (*common, rank, int(index), train.ids[int(index)], class_names[int(train_labels[index])], float(value), role)
                )
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def run_score(
    session: Session,
    csv_path: Any,
    *,
    top: int = 10,
    strategy: Optional[str] = None,
    measurement: str = "loss",
    matrix_path: Optional[Any] = None,
    out: Optional[Any] = None,
) -> ScoreResult:
    """Score test rows from a CSV against every training example; keep the top N each way."""
    from pathlib import Path

    from safetensors.torch import save_file

    from influence_cli.render.files import write_csv
    from influence_cli.data.queries import read_query_rows
    from influence_cli.run import atomic_path

    config, run = session.config, session.run
    strategy = strategy or config.influence.strategy
    start = time.perf_counter()
    csv_path = Path(csv_path)
    data = session.data()
    queries = read_query_rows(csv_path, config, data)
    members = ensure_members(session)
    state = members[0].state
    predicted = members_probs(members, _TensorRows(queries.inputs)).argmax(1)
    measured = np.where(queries.labels.numpy() >= 0, queries.labels.numpy(), predicted)
    k = min(top, len(data.train))
    result = members_pairwise(
        members, strategy, queries.inputs, torch.as_tensor(measured), measurement=measurement,
        top=None if matrix_path else k,
    )
    if not session.dist.is_main:
        return ScoreResult(None, queries, predicted, measured, time.perf_counter() - start, state, strategy, matrix_path)
    if matrix_path:
        matrix = result.detach().cpu().float()
        order = torch.argsort(matrix, dim=1, descending=True, stable=True)
        values_p, index_p = torch.gather(matrix, 1, order[:, :k]), order[:, :k]
        values_o, index_o = torch.gather(matrix, 1, order.flip(1)[:, :k]), order.flip(1)[:, :k]
        metadata = {
            "test_ids": json.dumps(list(queries.ids)),
            "train_ids": json.dumps(list(data.train.ids)),
            "measurement": measurement,
            "strategy": strategy,
            "sign": "positive = training example is a proponent of the test row",
        }
        with atomic_path(Path(matrix_path)) as tmp:
            save_file({"scores": matrix.contiguous()}, str(tmp), metadata=metadata)
    else:
        values_p, index_p = result.proponent_scores, result.proponent_indices
        values_o, index_o = result.opponent_scores, result.opponent_indices
    table = _score_rows(
        queries,
        predicted,
        values_p.double().numpy(),
        index_p.numpy(),
        values_o.double().numpy(),
        index_o.numpy(),
        data.train,
        list(data.class_names),
    )
    if not np.all(np.isfinite(table["influence"].to_numpy(dtype=float))):
        raise InflError("scores are not finite: set influence.damping to a larger number")
    target = Path(out) if out is not None and str(out) != "-" else run.scores_csv(csv_path.stem)
    write_csv(table, target)
    return ScoreResult(
        table, queries, predicted, measured, time.perf_counter() - start, state, strategy, matrix_path
    )


def pairwise_block(
    session: Session, model: nn.Module, factors: Any, test_inputs: torch.Tensor, test_labels: torch.Tensor, *,
    measurement: str, top: Optional[int], shard: Optional[tuple[int, int]] = None,
) -> Any:
    """Scores of the test rows against this process's block of the training set, with
    global training indices (the full matrix's columns or TopInfluences indices)."""
    from influence_cli.engine.scoring import pairwise_scores

    config = session.config
    bounds = shard_bounds(session, shard)
    device = influence_device(config)

    def score(batch_size: int) -> Any:
        with session.reporter.stages(bounds[1] - bounds[0]) as on_batch:
            return pairwise_scores(
                model, factors, train_loader(session, batch_size, bounds), test_inputs, test_labels,
                measurement=measurement, top=top, device=device, on_batch=on_batch, amp=config.influence.amp,
            )

    result = with_batch_backoff(session, "score", score)
    model.cpu()
    if top is not None and bounds[0]:
        from influence_cli.engine.scoring import TopInfluences

        result = TopInfluences(
            result.proponent_scores, result.proponent_indices + bounds[0],
            result.opponent_scores, result.opponent_indices + bounds[0],
        )
    return result


def merge_top(parts: list[Any], k: int) -> Any:
    """One TopInfluences from the per-block ones (global indices), keeping k each way;
    ties keep the lower training index first."""
    from influence_cli.engine.scoring import TopInfluences

    fields = []
    for values_name, index_name, largest in (
        ("proponent_scores", "proponent_indices", True), ("opponent_scores", "opponent_indices", False),
    ):
        values = torch.cat([getattr(p, values_name) for p in parts], dim=1)
        index = torch.cat([getattr(p, index_name) for p in parts], dim=1)
        order = torch.argsort(index, dim=1, stable=True)  # global index order, then a stable sort
        values, index = torch.gather(values, 1, order), torch.gather(index, 1, order)
        order = torch.argsort(values, dim=1, descending=largest, stable=True)[:, : min(k, values.shape[1])]
        fields += [torch.gather(values, 1, order), torch.gather(index, 1, order)]
    return TopInfluences(*fields)


def gather_scores(dist: DistContext, result: Any, top: Optional[int]) -> Any:
    """Every rank's block of scores, combined in global index order."""
    if top is None:
        return dist.gather_cat(result.detach().cpu(), dim=1)
    return merge_top(dist.all_gather_object(result), top)


# ----------------------------------------------------------------------------- check and report


@dataclass
class CheckOutcome:
    result: Any  # audit.check.CheckResult
    self_influence: SelfInfluenceResult
    thresholds_from: str


DEFAULT_MAX_FLAGGED_FRACTION = 0.02


def run_check(
    session: Session,
    *,
    max_flagged_fraction: Optional[float] = None,
    max_flagged: Optional[int] = None,
    baseline: Optional[Any] = None,
    strategy: Optional[str] = None,
) -> CheckOutcome:
    """Self-influence audit plus the thresholds; writes runs/<name>/check.csv."""
    from pathlib import Path

    from influence_cli.audit.check import evaluate_check, read_baseline
    from influence_cli.render.files import write_csv

    config = session.config
    baseline_ids = read_baseline(Path(baseline)) if baseline else None
    if baseline and config.data.source == "table" and config.data.id_column is None:
        session.reporter.warn(
            "--baseline: data.id_column is not set, so table ids are row numbers; inserting or deleting a row "
            "shifts every id and the baseline stops matching: add an id column and set data.id_column"
        )
    if max_flagged_fraction is None and max_flagged is None:
        max_flagged_fraction = config.audit.check.max_flagged_fraction
        max_flagged = config.audit.check.max_flagged
        source = "audit.check"
        if max_flagged_fraction is None and max_flagged is None:
            max_flagged_fraction = DEFAULT_MAX_FLAGGED_FRACTION
            source = "default"
    else:
        source = "command line"
    si = run_self_influence(session, strategy)
    result = evaluate_check(
        si.table, max_flagged_fraction=max_flagged_fraction, max_flagged=max_flagged, baseline_ids=baseline_ids
    )
    if session.dist.is_main:
        write_csv(result.offenders, session.run.root / "check.csv")
    return CheckOutcome(result, si, source)


def run_report(session: Session, *, strategy: Optional[str] = None, top: int = 50) -> Any:
    """Write runs/<name>/report.html from a fresh (or reused) self-influence audit."""
    from influence_cli.render.html import write_html_report

    si = run_self_influence(session, strategy)
    data = session.data()
    path = session.run.report_html
    if not session.dist.is_main:
        return path, si
    meta = {
        "config": session.config.name,
        "data source": session.config.data.source,
        "strategy": si.summary["run"]["strategy"],
        "training examples": si.summary["run"]["examples"],
        "flagged": si.summary["run"]["flagged"],
        "test accuracy": f"{si.model_state.test_accuracy:.3f}",
        "infl version": __version__,
    }
    path = session.run.report_html
    write_html_report(
        path,
        si.table,
        si.summary,
        title=f"infl audit: {session.config.name}",
        display=data.train.display,
        kind=data.kind,
        top=top,
        meta=meta,
    )
    return path, si
