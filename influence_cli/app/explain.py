"""`infl score`: the training examples behind each test row, as a table and a CSV."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from influence_cli.app.choice import resolve_strategy
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

    from influence_cli.data.queries import read_query_rows
    from influence_cli.render.files import write_csv
    from influence_cli.run import atomic_path

    config, run = session.config, session.run
    strategy = resolve_strategy(session, strategy)
    start = time.perf_counter()
    csv_path = Path(csv_path)
    data = session.data()
    queries = read_query_rows(csv_path, config, data)
    members = ensure_members(session)
    state = members[0].state
    predicted = predict_queries(members, queries.inputs)
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
    table = score_rows(
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
