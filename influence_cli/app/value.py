"""`infl value`: every training example's influence on a whole query set (a validation
split or a list of failures), ranked most harmful first and written to value.csv.

value_i = Σ_{t∈T} g_tᵀ (H + λI)⁻¹ g_i (``engine.value.value_scores``), averaged over the
ensemble members; positive = up-weighting i lowers the set's loss (helpful), negative =
harmful. ``share`` = value_i / Σ_j |value_j|: the signed part of the total influence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from influence_cli.app.factors import (
    FactorsState, influence_device, members_factors, shard_bounds, train_loader, warn_solver_limits,
    with_batch_backoff,
)
from influence_cli.app.model import Member, ensure_members
from influence_cli.app.scores import members_probs, predict_queries
from influence_cli.app.session import ModelState, Session
from influence_cli.errors import DataError, InflError

VALUE_COLUMNS = ["rank", "index", "id", "label", "predicted", "value", "share"]
SPLITS = ("test", "train")


@dataclass
class QuerySet:
    """The rows whose loss the value explains, measured against ``labels``."""

    name: str  # "the test split", "failures.csv", ... (shown in tables and the report)
    inputs: torch.Tensor
    labels: torch.Tensor  # the label each row is measured against (given, else predicted)
    given: np.ndarray  # (T,) given labels, -1 where the CSV gave none
    predicted: np.ndarray  # (T,) the model's (ensemble's) predicted class

    def __len__(self) -> int:
        return len(self.inputs)

    def misclassified(self) -> "QuerySet":
        """Only the labelled rows the model gets wrong (DataError when there are none)."""
        wrong = (self.given >= 0) & (self.predicted != self.given)
        if not wrong.any():
            raise DataError(f"--only-misclassified: the model gets every labelled row of {self.name} right; nothing to explain")
        keep = torch.from_numpy(np.flatnonzero(wrong))
        return QuerySet(f"misclassified rows of {self.name}", self.inputs[keep], self.labels[keep],
                        self.given[wrong], self.predicted[wrong])


def query_set(session: Session, members: list[Member], csv_path: Optional[Path] = None, split: str = "test") -> QuerySet:
    """The query rows: a CSV in `infl score`'s formats, else a split of the run's data."""
    data = session.data()
    if csv_path is not None:
        from influence_cli.data.queries import read_query_rows

        rows = read_query_rows(Path(csv_path), session.config, data)
        inputs, given, name = rows.inputs, rows.labels.numpy(), Path(csv_path).name
    else:
        if split not in SPLITS:
            raise InflError(f"--split: '{split}' is not one of {', '.join(SPLITS)}")
        part = data.test if split == "test" else data.train
        if len(part) == 0:
            raise DataError(f"--split {split}: the {split} split is empty; give a query CSV instead")
        inputs, given, name = part.inputs, part.labels.numpy(), f"the {split} split"
    predicted = predict_queries(members, inputs)
    measured = np.where(given >= 0, given, predicted)
    return QuerySet(name, inputs, torch.as_tensor(measured, dtype=torch.long), np.asarray(given), predicted)


def value_block(session: Session, model: Any, factors: Any, queries: QuerySet, measurement: str) -> torch.Tensor:
    """This process's block of the training set's values (all of it without torchrun)."""
    from influence_cli.engine.value import value_scores

    config = session.config
    bounds = shard_bounds(session)

    def score(batch_size: int) -> torch.Tensor:
        with session.reporter.stages(bounds[1] - bounds[0]) as on_batch:
            return value_scores(
                model, factors, train_loader(session, batch_size, bounds), queries.inputs, queries.labels,
                measurement=measurement, device=influence_device(config), on_batch=on_batch, amp=config.influence.amp,
            )

    values = with_batch_backoff(session, "value", score).detach().cpu()
    model.cpu()
    return session.dist.gather_cat(values) if session.dist.active else values


def members_value(
    members: list[Member], strategy: str, queries: QuerySet, *, measurement: str = "loss",
    fstates: Optional[list[FactorsState]] = None,
) -> np.ndarray:
    """value_i averaged over the ensemble members (float64, training order)."""
    fstates = fstates or members_factors(members, strategy, "value")
    total: Optional[np.ndarray] = None
    for member, fstate in zip(members, fstates):
        warn_solver_limits(member.session, fstate.factors, per_example=False)
        values = value_block(member.session, member.state.model, fstate.factors, queries, measurement).double().numpy()
        total = values if total is None else total + values
    assert total is not None
    return total / len(members)


def value_table(values: np.ndarray, train: Any, predicted: np.ndarray, class_names: list[str]) -> Any:
    """value.csv's frame: most harmful (most negative) first; ties keep training order."""
    import pandas as pd

    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    scale = float(np.abs(values).sum())
    labels = train.labels.numpy()
    names = np.asarray(class_names, dtype=object)
    return pd.DataFrame({
        "rank": np.arange(1, len(order) + 1),
        "index": order,
        "id": [str(train.ids[i]) for i in order],
        "label": names[labels[order]],
        "predicted": names[np.asarray(predicted)[order]],
        "value": values[order],
        "share": values[order] / scale if scale > 0 else np.zeros(len(order)),
    }, columns=VALUE_COLUMNS)


@dataclass
class ValueResult:
    table: Any  # pandas DataFrame with VALUE_COLUMNS, most harmful first
    queries: QuerySet
    seconds: float
    model_state: ModelState
    strategy: str
    measurement: str
    path: Optional[Path]


def run_value(
    session: Session, csv_path: Optional[Path] = None, *, split: str = "test", measurement: str = "loss",
    strategy: Optional[str] = None, only_misclassified: bool = False, out: Optional[Path] = None,
) -> ValueResult:
    """Rank the training set by its influence on the query set; writes value.csv (and
    value.json: what the set was, for the report) on rank 0."""
    from influence_cli.app.choice import resolve_strategy
    from influence_cli.render.files import write_csv, write_json

    start = time.perf_counter()
    members = ensure_members(session)
    queries = query_set(session, members, csv_path, split)
    if only_misclassified:
        queries = queries.misclassified()
    strategy = resolve_strategy(session, strategy)  # auto → exact or ekfac, said once the queries are valid
    values = members_value(members, strategy, queries, measurement=measurement)
    if not np.all(np.isfinite(values)):
        raise InflError("value scores are not finite: set influence.damping to a larger number")
    data = session.data()
    table = value_table(values, data.train, members_probs(members, data.train).argmax(1), list(data.class_names))
    path = None
    if session.dist.is_main:
        session.run.ensure()
        write_json({"set": queries.name, "rows": len(queries), "measurement": measurement, "strategy": strategy,
                    "total": float(values.sum())}, session.run.root / "value.json")
        path = write_csv(table, session.run.root / "value.csv")
        if out is not None and str(out) != "-":
            write_csv(table, out)
    return ValueResult(table, queries, time.perf_counter() - start, members[0].state, strategy, measurement, path)
