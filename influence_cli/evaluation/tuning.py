"""``infl evaluate --lds --tune-damping``: choose the damping factor by measurement.

Recipe: for the run's strategy (``influence.strategy`` resolved, or the one ``-s`` names),
fit the factors once per factor f of a small grid (``damping: auto`` with
``damping_factor = f``, kept in memory, the stored factors untouched) and score each on a
*cheap, held-out* LDS: ``subsets`` retrainings (default 20, cached in ``runs/<name>/lds/``
like every LDS retraining) measured on the LAST ``test_rows`` rows of the test split, so
the rows the tuning looks at are not the first rows ``infl evaluate --lds`` reports (when
the test split holds both). The best factor (highest mean LDS) is written to
``runs/<name>/damping.json`` under the strategy's name, with the checkpoint hash and the
training data's fingerprint it was measured on; ``influence.damping: tuned`` then uses it
(``app.tuning``) and refuses it once the model or the data changed.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import numpy as np

from influence_cli import __version__
from influence_cli.config import Config
from influence_cli.errors import InflError
from influence_cli.progress import Reporter
from influence_cli.run import atomic_write_json, read_json

from .common import Stopwatch, clean_number, json_safe
from .lds import _check_arguments, _plan, _summary, lds_per_row
from .retraining import run_retrainings

__all__ = ["DEFAULT_GRID", "tune_damping"]

DEFAULT_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def tune_damping(
    config: Config,
    *,
    strategy: Optional[str] = None,
    grid: Iterable[float] = DEFAULT_GRID,
    subsets: int = 20,
    fraction: float = 0.5,
    test_rows: int = 100,
    measurement: str = "loss",
    reporter: Optional[Reporter] = None,
) -> dict[str, Any]:
    """LDS per damping factor on held-out test rows; the best is stored in damping.json.

    Tunes member 0 of an ensemble (the others share its factor). Returns the
    JSON-serialisable result (also written to ``runs/<name>/damping_tuning.json``).
    """
    from influence_cli.app import FactorsState, Session, ensure_members, members_pairwise
    from influence_cli.app.choice import resolve_strategy
    from influence_cli.app.factors import fit_in_memory
    from influence_cli.app.tuning import damping_path

    factors_grid = sorted({float(f) for f in grid})
    if not factors_grid or any(not f > 0 for f in factors_grid):
        raise InflError("evaluate --tune-damping: the grid needs damping factors > 0, e.g. --grid 0.1,1,10")
    _check_arguments(subsets, fraction, 1, test_rows, measurement)
    reporter = reporter or Reporter()
    total = Stopwatch()
    session = Session(config, reporter)
    name = resolve_strategy(session, strategy)
    members = ensure_members(session)[:1]
    state = members[0].state
    plan = _plan(session, subsets=subsets, fraction=fraction, seeds=1, test_rows=test_rows,
                 measurement=measurement, last_rows=True)
    retrained = run_retrainings(plan, session.dist, reporter)
    measured, membership = retrained.measured.mean(axis=1).T, plan.membership()
    points = []
    for factor in factors_grid:
        watch = Stopwatch()
        factors = fit_in_memory(session, state, name, damping="auto", damping_factor=factor)
        fstate = FactorsState(factors, False, watch(), None)
        scores = members_pairwise(members, name, plan.test_x, plan.test_y, measurement=measurement, top=None,
                                  fstates=[fstate])
        per_row = lds_per_row(measured, scores.detach().cpu().double().numpy(), membership, measurement)
        summary = _summary(per_row)
        points.append({"damping_factor": factor, "mean": summary["mean"], "stderr": summary["stderr"],
                       "rows": summary["rows"], "seconds": watch()})
    valid = [p for p in points if p["mean"] is not None and np.isfinite(p["mean"])]
    if not valid:
        raise InflError("evaluate --tune-damping: no grid point gave a finite LDS; widen the grid")
    best = max(valid, key=lambda p: p["mean"])
    entry = {
        "best_factor": best["damping_factor"], "best_lds": clean_number(best["mean"], 6),
        "checkpoint_hash": state.checkpoint_hash, "data_fingerprint": session.data_fingerprint(),
        "grid": [{k: (clean_number(v, 6) if isinstance(v, float) else v) for k, v in p.items()} for p in points],
        "subsets": int(subsets), "fraction": float(fraction), "test_rows": len(plan.test_ids),
        "test_row_selection": "last rows of the test split", "measurement": measurement,
        "version": __version__,
    }
    result = json_safe({"evaluation": "damping_tuning", "config": config.name, "strategy": name,
                        "strategy_reason": session.strategy_choice.reason if session.strategy_choice else None,
                        **entry, "seconds": clean_number(total(), 3), "file": str(damping_path(session))})
    if session.dist.is_main:
        session.run.ensure()
        path = damping_path(session)
        stored = read_json(path) if path.is_file() else {}
        stored = stored if isinstance(stored, dict) else {}
        atomic_write_json(path, json_safe({**stored, name: entry}))
    return result
