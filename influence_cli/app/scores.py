"""Self-influence and pairwise scores over the training set, for one model or an ensemble, ranked and written."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from influence_cli.app.choice import resolve_strategy
from influence_cli.app.factors import (
    FactorsState,
    influence_device,
    members_factors,
    shard_bounds,
    train_loader,
    warn_solver_limits,
    with_batch_backoff,
)
from influence_cli.app.model import Member, ensure_members
from influence_cli.app.session import ModelState, Session
from influence_cli.distributed import DistContext
from influence_cli.errors import InflError
from influence_cli.training import predict_probs


def self_influence_scores(session: Session, model: nn.Module, factors: Any) -> torch.Tensor:
    """Self-influence of the training set: this rank's block, gathered over ranks in global
    index order; a --shard job's block alone (``session.shard``)."""
    from influence_cli.engine.scoring import self_influence

    config = session.config
    bounds = shard_bounds(session)
    device = influence_device(config)

    def score(batch_size: int) -> torch.Tensor:
        with session.reporter.stages(bounds[1] - bounds[0]) as on_batch:
            return self_influence(
                model, factors, train_loader(session, batch_size, bounds), device=device,
                on_batch=on_batch, amp=config.influence.amp,
            )

    scores = with_batch_backoff(session, "self-influence", score).detach().cpu()
    model.cpu()
    if session.shard is None and session.dist.active:
        scores = session.dist.gather_cat(scores)
    return scores


def mislabel_terms_block(session: Session, model: nn.Module, factors: Any) -> dict[str, torch.Tensor]:
    """The engine's mislabel terms (``engine.mislabel``) of the training set in index
    order, this rank's block gathered over ranks (a --shard job: its block alone)."""
    from influence_cli.engine.mislabel import mislabel_terms

    config = session.config
    bounds = shard_bounds(session)
    device = influence_device(config)

    def score(batch_size: int) -> dict[str, torch.Tensor]:
        with session.reporter.stages(bounds[1] - bounds[0]) as on_batch:
            return mislabel_terms(
                model, factors, train_loader(session, batch_size, bounds), device=device,
                on_batch=on_batch, amp=config.influence.amp,
            )

    terms = with_batch_backoff(session, "self-influence", score)
    model.cpu()
    if session.shard is None and session.dist.active:
        terms = {name: session.dist.gather_cat(value.detach().cpu()) for name, value in terms.items()}
    return terms


def members_mislabel_scores(
    members: list[Member], strategy: str, fstates: Optional[list[FactorsState]] = None
) -> tuple[dict[str, np.ndarray], list[FactorsState]]:
    """Every ``audit.score`` (``audit.scores.SCORES``) of every training example, float64,
    averaged over the ensemble members (each member's scores use its own alternative label)."""
    from influence_cli.audit.scores import mislabel_scores

    fstates = fstates or members_factors(members, strategy, "self-influence")
    total: dict[str, np.ndarray] = {}
    for member, fstate in zip(members, fstates):
        warn_solver_limits(member.session, fstate.factors, per_example=True)
        terms = mislabel_terms_block(member.session, member.state.model, fstate.factors)
        probabilities = terms.pop("probabilities")
        if member.session.shard is None:  # the whole training set, in index order
            member.state.probs.setdefault("train", probabilities.float())
        n = len(member.session.data().train)
        scores = mislabel_scores({k: v.double().numpy() for k, v in terms.items()}, n)
        total = scores if not total else {k: total[k] + v for k, v in scores.items()}
    return {k: v / len(members) for k, v in total.items()}, fstates


@dataclass
class SelfInfluenceResult:
    table: Any  # pandas DataFrame in the output contract's columns
    summary: dict[str, Any]
    seconds: float
    model_state: ModelState
    factors_state: FactorsState
    members: list[Any] = field(default_factory=list)


def members_self_influence(
    members: list[Member], strategy: str, fstates: Optional[list[FactorsState]] = None
) -> tuple[np.ndarray, list[FactorsState]]:
    """Self-influence averaged over the ensemble members, float64, in training order
    (under torchrun each rank scores its block and every rank gets the whole vector).
    ``fstates``: the members' factors when the caller already holds them."""
    fstates = fstates or members_factors(members, strategy, "self-influence")
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

    fstates = fstates or members_factors(members, strategy, "score")
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


class TensorRows:
    """The minimal dataset view predict_probs needs for query rows."""

    def __init__(self, inputs: torch.Tensor):
        self.inputs = inputs
        self.labels = torch.zeros(len(inputs), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.inputs[i], self.labels[i], i


def predict_queries(members: list[Member], inputs: torch.Tensor) -> np.ndarray:
    """The predicted class of each query row (ensemble-averaged probabilities): the one
    prediction rule of `infl score`, its --shard jobs and `infl merge`."""
    return members_probs(members, TensorRows(inputs)).argmax(1)


def run_self_influence(session: Session, strategy: Optional[str] = None) -> Any:
    """Self-influence of every training example, ranked and flagged; writes the CSVs
    (rank 0 only under torchrun) and returns a SelfInfluenceResult.

    With an ensemble the scores and the predicted probabilities are averaged over members.
    A ``--shard i/n`` session scores its block with the stored factors and writes it as a
    shard file instead (a ShardResult; `infl merge` ranks the whole set).
    """
    strategy = resolve_strategy(session, strategy)
    start = time.perf_counter()
    members = ensure_members(session)
    if session.config.audit.score == "self_influence" or session.config.task == "regression":
        scores_np, fstates = members_self_influence(members, strategy)
        ranked, every = None, None
    else:
        every, fstates = members_mislabel_scores(members, strategy)
        scores_np, ranked = every["self_influence"], every[session.config.audit.score]
    if session.shard is not None:
        from influence_cli.app.shards import write_self_influence_shard

        return write_self_influence_shard(session, members[0].state, strategy, shard_bounds(session), scores_np, every)
    return finish_self_influence(session, scores_np, members, fstates, strategy, start, ranked)


def finish_self_influence(
    session: Session, scores: np.ndarray, members: list[Member], fstates: list[Any], strategy: str, start: float,
    ranked: Optional[np.ndarray] = None,
) -> SelfInfluenceResult:
    """Rank, flag and write the CSVs (rank 0 only) from the self-influence of every example
    and, when ``audit.score`` is another score, that score's values (``ranked``)."""
    from influence_cli.audit.ranking import build_ranking, class_summary
    from influence_cli.render.files import write_csv, write_json

    config, run = session.config, session.run
    scores_np = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(scores_np)):
        raise InflError("self-influence produced non-finite values: set influence.damping to a larger number")
    data = session.data()
    probs = members_probs(members, data.train)
    if config.task == "regression":
        from influence_cli.audit.regression import build_regression_ranking, regression_summary

        table = build_regression_ranking(scores_np, data.train.labels.numpy(), probs, list(data.train.ids), config.audit.flag)
        summary = regression_summary(table, data.class_names[0])
    else:
        table = build_ranking(
            scores_np, data.train.labels.numpy(), probs, list(data.train.ids), list(data.class_names), config.audit.flag,
            score=ranked, score_name=config.audit.score if ranked is not None else "self_influence",
        )
        summary = class_summary(table, list(data.class_names))
    seconds = time.perf_counter() - start
    state = members[0].state
    summary["run"] = {
        "name": config.name,
        "strategy": strategy,
        "score": config.audit.score if ranked is not None else "self_influence",
        "examples": int(len(table)),
        "flagged": int(table["flagged"].sum()),
        "seconds": round(seconds, 3),
        "train_accuracy": state.train_accuracy,
        "test_accuracy": state.test_accuracy,
        "flag_rule": config.audit.flag.model_dump(mode="json"),
    }
    if config.task == "regression":
        summary["run"]["task"] = "regression"  # the accuracies are R² of the first output
    if len(members) > 1 and config.task == "classification":
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


def pairwise_block(
    session: Session, model: nn.Module, factors: Any, test_inputs: torch.Tensor, test_labels: torch.Tensor, *,
    measurement: str, top: Optional[int],
) -> Any:
    """Scores of the test rows against this process's block of the training set, with
    global training indices (the full matrix's columns or TopInfluences indices)."""
    from influence_cli.engine.scoring import pairwise_scores

    config = session.config
    bounds = shard_bounds(session)
    device = influence_device(config)

    def score(batch_size: int) -> Any:
        with session.reporter.stages(bounds[1] - bounds[0]) as on_batch:
            return pairwise_scores(
                model, factors, train_loader(session, batch_size, bounds), test_inputs, test_labels,
                measurement=measurement, top=top, device=device, on_batch=on_batch, amp=config.influence.amp,
                query_rank=config.influence.query_rank,
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
