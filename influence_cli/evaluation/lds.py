"""``infl evaluate --lds``: the linear datamodeling score (LDS) against real retraining.

Recipe:

1. The model and factors come from the normal pipeline (``ensure_model`` /
   ``ensure_factors``) on the full training set, in the run's own directory. (With
   ``model.checkpoint`` the scores come from the user's weights while the subsets are
   retrained with the config's ``train`` settings: the LDS is only meaningful when those
   settings match how the checkpoint was trained.)
2. Test rows: the FIRST ``test_rows`` rows of the test split (deterministic; every
   source's test split is already in a seeded shuffled or stratified order).
3. Subsets: ``subsets`` random subsets of the training set, each of size
   round(fraction·N), drawn without replacement. Subset r comes from its own generator
   seeded by (config.seed, r), so it does not depend on how many subsets are asked for:
   asking for 6 after 4 reuses the first 4.
4. For each subset r and seed s (0 ≤ s < ``seeds``) a fresh model is built and trained with
   the config's training settings on ``train.subset(indices)`` with seed
   ``config.seed + 1000·(r+1) + s``. The measurement of each test row is cached in
   ``runs/<name>/lds/<key>.json``, written atomically, where key is a hash of
   (training hash of the config, subset indices, seed, measurement, test rows), so an
   interrupted run resumes and every finished retraining is reused. The measurements
   are averaged over seeds.
5. Predictions. score(t, i) = g_tᵀ (H + λI)⁻¹ g_i from ``pairwise_scores(..., top=None)``;
   positive ⇒ up-weighting i lowers the test loss. Training on subset S instead of the
   whole set removes the other examples, so to first order
   loss_t(S) ≈ loss_t(all) + (1/N)·Σ_{i∉S} score(t, i) = const − (1/N)·Σ_{i∈S} score(t, i).
   Hence predicted loss = −Σ_{i∈S} score. With measurement="margin" the engine's test
   objective is −margin, so the same argument gives −margin(S) ≈ const − Σ score, i.e.
   predicted margin = +Σ_{i∈S} score. (``prediction_sign``.)
6. LDS: Spearman correlation, per test row, between the measured and the predicted
   values across the subsets; reported as the mean over rows and its standard error
   (std/√rows). Rows whose measurement or prediction is constant across the subsets have
   no correlation and are left out (``rows`` counts the rows used).

Output: ``runs/<name>/lds.json`` (the returned dict), written atomically.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import numpy as np

from influence_cli import __version__
from influence_cli.config import Config
from influence_cli.errors import InflError
from influence_cli.progress import Reporter
from influence_cli.run import atomic_write_json, training_hash

from .common import Stopwatch, clean_number, json_safe, resolve_auto, resolve_strategies, rounded_entry, score_strategies
from .metrics import spearman
from .retraining import RetrainingPlan, Retrained, measure, retrain_seed, run_retrainings, subset_indices

__all__ = [
    "MEASUREMENTS",
    "prediction_sign",
    "subset_indices",
    "retrain_seed",
    "measure",
    "lds_per_row",
    "evaluate_lds",
]

MEASUREMENTS = ("loss", "margin")
LDS_KEYS = ("mean", "stderr")


def prediction_sign(measurement: str) -> float:
    """Predicted measurement of a subset = sign · Σ_{i∈S} score(t, i) (see module doc)."""
    if measurement == "loss":
        return -1.0
    if measurement == "margin":
        return 1.0
    raise InflError(f"evaluate --lds: measurement must be one of {MEASUREMENTS}, not {measurement!r}")


def lds_per_row(measured: np.ndarray, scores: np.ndarray, membership: np.ndarray, measurement: str) -> np.ndarray:
    """Spearman correlation per test row between measured (T, R) values and the
    predictions sign · scores (T, N) @ membership (R, N)ᵀ; NaN for constant rows."""
    predicted = prediction_sign(measurement) * (np.asarray(scores, np.float64) @ np.asarray(membership, np.float64).T)
    out = np.full(measured.shape[0], np.nan)
    for t in range(measured.shape[0]):
        out[t] = spearman(measured[t], predicted[t])
    return out


def _summary(per_row: np.ndarray) -> dict[str, Any]:
    valid = per_row[np.isfinite(per_row)]
    rows = int(valid.size)
    mean = float(valid.mean()) if rows else float("nan")
    stderr = float(valid.std(ddof=1) / math.sqrt(rows)) if rows > 1 else float("nan")
    return {"mean": mean, "stderr": stderr, "rows": rows}


def _check_arguments(subsets: int, fraction: float, seeds: int, test_rows: int, measurement: str) -> None:
    prediction_sign(measurement)  # validates
    if subsets < 2:
        raise InflError(f"evaluate --lds: needs at least 2 subsets to rank, not {subsets}")
    if seeds < 1:
        raise InflError(f"evaluate --lds: seeds must be at least 1, not {seeds}")
    if not 0.0 < float(fraction) < 1.0:
        raise InflError(f"evaluate --lds: the subset fraction must lie in (0, 1), not {fraction}")
    if test_rows < 1:
        raise InflError(f"evaluate --lds: test_rows must be at least 1, not {test_rows}")


def _plan(session: Any, *, subsets: int, fraction: float, seeds: int, test_rows: int, measurement: str,
          last_rows: bool = False) -> RetrainingPlan:
    """The subsets, test rows and cache of this run (steps 2–4 of the recipe); ``last_rows``
    takes the last rows of the test split instead of the first (the damping tuner's
    held-out rows)."""
    from influence_cli.data.fingerprint import fingerprint_split

    config, data = session.config, session.data()
    n = len(data.train)
    size = int(round(float(fraction) * n))
    if not 1 <= size < n:
        raise InflError(f"evaluate --lds: fraction {fraction} of {n} training examples gives subsets of {size}")
    t_count = min(int(test_rows), len(data.test))
    if t_count < 1:
        raise InflError("evaluate --lds: the test split is empty")
    rows = slice(len(data.test) - t_count, len(data.test)) if last_rows else slice(0, t_count)
    test_x, test_y = data.test.inputs[rows], data.test.labels[rows]
    test_ids = list(data.test.ids[rows])
    return RetrainingPlan(
        config=config, data=data, subsets=subsets, fraction=float(fraction), seeds=seeds, size=size, measurement=measurement,
        test_x=test_x, test_y=test_y, test_ids=test_ids, cache_dir=session.run.root / "lds",
        base_hash=training_hash(config, session.data_fingerprint()),
        test_rows_hash=fingerprint_split(test_x, test_y, test_ids, data.class_names),
    )


def evaluate_lds(
    config: Config,
    *,
    subsets: int = 100,
    fraction: float = 0.5,
    seeds: int = 1,
    test_rows: int = 100,
    measurement: str = "loss",
    strategies: Optional[Iterable[str]] = None,
    reporter: Optional[Reporter] = None,
) -> dict[str, Any]:
    """Linear datamodeling score of each strategy against retraining on random subsets.

    Returns the JSON-serialisable result that is also written to ``runs/<name>/lds.json``.
    A strategy that raises an InflError/InfluenceError (other than stale stored factors,
    which need ``--overwrite`` like everywhere else) is recorded as ``{"skipped": reason}``.
    """
    from influence_cli.app import Session, ensure_members, members_pairwise

    _check_arguments(subsets, fraction, seeds, test_rows, measurement)
    names = resolve_strategies(strategies)
    reporter = reporter or Reporter()
    total = Stopwatch()
    session = Session(config, reporter)
    session.data()
    names = resolve_auto(session, names)
    members = ensure_members(session)
    plan = _plan(session, subsets=subsets, fraction=fraction, seeds=seeds, test_rows=test_rows, measurement=measurement)
    retrained = run_retrainings(plan, session.dist, reporter)
    mean_measured = retrained.measured.mean(axis=1).T  # (T, R)
    membership = plan.membership()

    def score(name: str, fstates: list) -> Any:
        return members_pairwise(members, name, plan.test_x, plan.test_y, measurement=measurement, top=None, fstates=fstates)

    results: dict[str, dict[str, Any]] = {}
    for outcome in score_strategies(members, names, score, reporter, stale_is_fatal=True):
        if outcome.skipped is not None:
            results[outcome.name] = {"skipped": outcome.skipped}
            continue
        scores = outcome.value.detach().cpu().double().numpy()
        per_row = lds_per_row(mean_measured, scores, membership, measurement)
        results[outcome.name] = {**_summary(per_row), **outcome.timings()}
    result = _lds_result(plan, members, retrained, results, spread=mean_measured.std(axis=1), seconds=total())
    if session.dist.is_main:
        session.run.ensure()
        atomic_write_json(session.run.root / "lds.json", result)
    return result


def _lds_result(plan: RetrainingPlan, members: list, retrained: Retrained, results: dict[str, Any], *,
                spread: np.ndarray, seconds: float) -> dict[str, Any]:
    """The JSON-ready result (lds.json)."""
    config, state = plan.config, members[0].state
    retraining = {
        "models": plan.subsets * plan.seeds,
        "trained_now": retrained.trained_now,
        "reused": retrained.reused,
        "seconds_now": retrained.seconds_now,
        "seconds_total": retrained.seconds_total,
        "cache_dir": str(plan.cache_dir),
        "mean_spread_across_subsets": float(spread.mean()),
    }
    result = {
        "evaluation": "lds",
        "config": config.name,
        "run_dir": str(plan.cache_dir.parent),
        "measurement": plan.measurement,
        "subsets": int(plan.subsets),
        "fraction": float(plan.fraction),
        "subset_size": plan.size,
        "seeds": int(plan.seeds),
        "ensemble": len(members),
        "examples": len(plan.data.train),
        "test_rows": len(plan.test_ids),
        "test_row_selection": "first rows of the test split",
        "full_model": {
            "train_accuracy": clean_number(state.train_accuracy, 6),
            "test_accuracy": clean_number(state.test_accuracy, 6),
        },
        "retraining": {k: (clean_number(v, 3) if isinstance(v, float) else v) for k, v in retraining.items()},
        "strategies": {k: rounded_entry(v, LDS_KEYS) for k, v in results.items()},
        "seconds": clean_number(seconds, 3),
        "version": __version__,
    }
    return json_safe(result)
