"""`infl score`: the training examples behind each test row, as a table and a CSV."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from influence_cli.app.choice import resolve_strategy
from influence_cli.app.factors import shard_bounds
from influence_cli.app.model import ensure_members
from influence_cli.app.scores import members_pairwise, predict_queries
from influence_cli.app.session import ModelState, Session
from influence_cli.errors import InflError

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


def score_rows(
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


def scores_target(session: Session, csv_path: Any, out: Optional[Any]) -> Any:
    """Where `infl score` writes its CSV: ``--out`` (unless '-'), else runs/<name>/scores/<stem>.csv."""
    from pathlib import Path

    return Path(out) if out is not None and str(out) != "-" else session.run.scores_csv(Path(csv_path).stem)


def top_of_matrix(matrix: torch.Tensor, k: int) -> Any:
    """The k largest and k smallest scores of each row of the full matrix (ties: lower index first)."""
    from influence_cli.engine.scoring import TopInfluences

    order = torch.argsort(matrix, dim=1, descending=True, stable=True)
    best, worst = order[:, :k], order.flip(1)[:, :k]
    return TopInfluences(torch.gather(matrix, 1, best), best, torch.gather(matrix, 1, worst), worst)


def write_score_table(session: Session, queries: Any, predicted: np.ndarray, top: Any, target: Optional[Any]) -> Any:
    """The score table from each row's top-k both ways, checked finite and written to
    ``target`` (None: not written): one ending for `infl score`, `infl merge` and the API."""
    from influence_cli.render.files import write_csv

    data = session.data()
    table = score_rows(
        queries, predicted, top.proponent_scores.double().numpy(), top.proponent_indices.numpy(),
        top.opponent_scores.double().numpy(), top.opponent_indices.numpy(), data.train, list(data.class_names),
    )
    if not np.all(np.isfinite(table["influence"].to_numpy(dtype=float))):
        raise InflError("scores are not finite: set influence.damping to a larger number")
    if target is not None:
        write_csv(table, target)
    return table


def run_score(
    session: Session,
    csv_path: Any,
    *,
    top: int = 10,
    strategy: Optional[str] = None,
    measurement: str = "loss",
    matrix_path: Optional[Any] = None,
    out: Optional[Any] = None,
) -> Any:
    """Score test rows from a CSV against every training example; keep the top N each way
    (a ScoreResult). A ``--shard i/n`` session scores its block and writes the block's top N
    as a shard file instead (a ShardResult; `infl merge` writes the CSV)."""
    from pathlib import Path

    from influence_cli.data.queries import read_query_rows

    start = time.perf_counter()
    csv_path = Path(csv_path)
    queries = read_query_rows(csv_path, session.config, session.data())
    result = score_queries(
        session, queries, top=top, strategy=strategy, measurement=measurement, matrix_path=matrix_path,
        csv_path=csv_path, out=out,
    )
    if isinstance(result, ScoreResult):
        result.seconds = time.perf_counter() - start
    return result


def score_queries(
    session: Session, queries: Any, *, top: int, strategy: str, measurement: str = "loss",
    matrix_path: Optional[Any] = None, csv_path: Optional[Any] = None, out: Optional[Any] = None,
) -> Any:
    """The top ``top`` proponents and opponents of each query row (a QueryRows), as a
    table in SCORE_COLUMNS (None on ranks other than 0); ``matrix_path`` also keeps the
    full (T, N) matrix. With ``csv_path`` (`infl score`) the table is written to --out or
    runs/<name>/scores/<stem>.csv, or a shard session writes its shard file; without it
    (the Python API's ``Auditor.score``) nothing is written."""
    if session.config.task == "regression":
        raise InflError(
            "scoring query rows supports task: classification only so far; for regression use self-influence "
            "(infl self-influence / Auditor.self_influence)"
        )
    start = time.perf_counter()
    strategy = resolve_strategy(session, strategy)  # auto → exact or ekfac, said once the queries are read
    data = session.data()
    members = ensure_members(session)
    state = members[0].state
    predicted = predict_queries(members, queries.inputs)
    measured = np.where(queries.labels.numpy() >= 0, queries.labels.numpy(), predicted)
    k = min(top, len(data.train))
    result = members_pairwise(
        members, strategy, queries.inputs, torch.as_tensor(measured), measurement=measurement,
        top=None if matrix_path else k,
    )
    if session.shard is not None:
        from influence_cli.app.shards import write_score_shard

        return write_score_shard(
            session, state, strategy, shard_bounds(session), csv_path, result, top=k, measurement=measurement, out=out
        )
    if not session.dist.is_main:
        return ScoreResult(None, queries, predicted, measured, time.perf_counter() - start, state, strategy, matrix_path)
    if matrix_path:
        matrix = result.detach().cpu().float()
        save_matrix(matrix, matrix_path, queries, data, measurement, strategy, session.config.influence.query_rank)
        result = top_of_matrix(matrix, k)
    target = None if csv_path is None else scores_target(session, csv_path, out)
    table = write_score_table(session, queries, predicted, result, target)
    return ScoreResult(
        table, queries, predicted, measured, time.perf_counter() - start, state, strategy, matrix_path
    )


def save_matrix(
    matrix: torch.Tensor, path: Any, queries: Any, data: Any, measurement: str, strategy: str, query_rank: int = 0
) -> None:
    """``--matrix``: the full test × train scores with row and column ids (safetensors)."""
    from pathlib import Path

    from safetensors.torch import save_file

    from influence_cli.run import atomic_path

    metadata = {
        "test_ids": json.dumps(list(queries.ids)),
        "train_ids": json.dumps(list(data.train.ids)),
        "measurement": measurement,
        "strategy": strategy,
        "sign": "positive = training example is a proponent of the test row",
    }
    if query_rank:
        metadata["approximation"] = f"query_rank={query_rank}: rank-k test gradients"
    with atomic_path(Path(path)) as tmp:
        save_file({"scores": matrix.contiguous()}, str(tmp), metadata=metadata)
