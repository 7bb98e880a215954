"""Helpers shared by the detection and LDS evaluations."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional


from influence_cli.render.files import jsonable as json_safe  # noqa: F401  (re-exported: one JSON-cleaning rule for every file we write)

from influence_cli.errors import FactorsError, InflError

def default_strategies() -> list[str]:
    """Every registered strategy except the slow ones (``Strategy.slow``: self-influence
    and pairwise scores solve one iterative problem per example), in registry order."""
    from influence_cli.engine import STRATEGIES

    return [name for name, cls in STRATEGIES.items() if not cls.slow]


def resolve_strategies(strategies: Optional[Iterable[str]]) -> list[str]:
    if strategies is None:
        return default_strategies()
    names = []
    for name in strategies:
        if name not in names:
            names.append(str(name))
    if not names:
        raise InflError("evaluate: no strategies given; name at least one (e.g. ekfac)")
    return names


@dataclass
class TimedFactors:
    state: Any  # the pipeline's FactorsState (its .factors), scored without loading again
    fit_seconds: float  # time to fit them (now, or as recorded when they were stored)
    reused: bool


def timed_factors(session: Any, state: Any, strategy: str) -> TimedFactors:
    """``ensure_factors`` plus the fitting wall time, also for factors reused from disk.

    Stale factors are refitted, as in every audit command.
    """
    from influence_cli.engine import read_meta
    from influence_cli.pipeline import ensure_factors

    fstate = ensure_factors(session, state, strategy, refit_stale=True)
    if not fstate.reused:
        return TimedFactors(fstate, float(fstate.seconds), False)
    try:
        recorded = read_meta(fstate.directory).get("fit_seconds")
    except FactorsError:
        recorded = None
    seconds = float(recorded) if isinstance(recorded, (int, float)) else float(fstate.seconds)
    return TimedFactors(fstate, seconds, True)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def clean_number(value: Any, digits: int = 6) -> Optional[float]:
    """A JSON-safe float (None for NaN/inf), rounded for readable files."""
    value = float(value)
    if not math.isfinite(value):
        return None
    return round(value, digits)


def derived_config(config: Any, *, name: str, updates: dict[str, Any]) -> Any:
    """A validated copy of ``config`` with a new name and dotted-key updates applied."""
    from influence_cli.config import config_from_dict

    data = config.model_dump(mode="json")
    data["name"] = name
    for dotted, value in updates.items():
        node = data
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    derived = config_from_dict(data, config.source_file, base_dir=config.base_dir)
    return derived


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "—"
    return f"{float(value):.{digits}f}"


def fmt_seconds(value: Any) -> str:
    if value is None:
        return "—"
    value = float(value)
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 10:
        return f"{value:.2f} s"
    if value < 600:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"
