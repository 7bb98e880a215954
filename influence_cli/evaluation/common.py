"""Helpers shared by the detection and LDS evaluations, and their one per-strategy loop
(:func:`score_strategies`: fit or reuse each strategy's factors, time it, score, collect)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

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


def resolve_auto(session: Any, names: list[str]) -> list[str]:
    """``names`` with ``auto`` replaced by the strategy it resolves to (duplicates dropped)."""
    from influence_cli.app.choice import AUTO, resolve_strategy

    out: list[str] = []
    for name in names:
        name = resolve_strategy(session, name) if name == AUTO else name
        if name not in out:
            out.append(name)
    return out


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
    from influence_cli.app import ensure_factors

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


def is_memory_error(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate" in text)


@dataclass
class StrategyOutcome:
    """One strategy's scores (whatever ``score`` returned) and timings, or why it was skipped."""

    name: str
    value: Any = None
    fit_seconds: float = 0.0
    score_seconds: float = 0.0
    factors_reused: bool = True
    skipped: Optional[str] = None

    def timings(self) -> dict[str, Any]:
        return {
            "seconds": self.fit_seconds + self.score_seconds,
            "fit_seconds": self.fit_seconds,
            "score_seconds": self.score_seconds,
            "factors_reused": self.factors_reused,
        }


Score = Callable[[str, list], Any]  # (strategy name, every member's FactorsState) -> scores


def score_strategy(members: list, name: str, score: Score, reporter: Any, *, stale_is_fatal: bool = False) -> StrategyOutcome:
    """Fit (or reuse) every ensemble member's factors for ``name`` — first, so that the
    scoring time is scoring only — then call ``score``. An InflError (InfluenceError,
    FactorsError, ...) or running out of memory skips the strategy with a warning;
    ``stale_is_fatal`` re-raises FactorsError (stale stored factors need --overwrite)."""
    try:
        outcome = StrategyOutcome(name)
        fstates = []
        for member in members:
            timed = timed_factors(member.session, member.state, name)
            outcome.fit_seconds += timed.fit_seconds
            outcome.factors_reused = outcome.factors_reused and timed.reused
            fstates.append(timed.state)
        watch = Stopwatch()
        outcome.value = score(name, fstates)
        outcome.score_seconds = watch()
        return outcome
    except InflError as exc:
        if stale_is_fatal and isinstance(exc, FactorsError):
            raise
        reason = said = str(exc)
    except (MemoryError, RuntimeError) as exc:
        if not is_memory_error(exc):
            raise
        reason, said = f"out of memory: {exc}".strip(), "out of memory"
    finally:
        for member in members:
            member.state.model.cpu()
    reporter.warn(f"{name}: skipped: {said}")
    return StrategyOutcome(name, skipped=reason)


def score_strategies(members: list, names: Iterable[str], score: Score, reporter: Any, *,
                     stale_is_fatal: bool = False) -> list[StrategyOutcome]:
    """The per-strategy loop of every evaluation: :func:`score_strategy` for each name."""
    return [score_strategy(members, name, score, reporter, stale_is_fatal=stale_is_fatal) for name in names]


def rounded_entry(entry: dict[str, Any], metric_keys: Iterable[str]) -> dict[str, Any]:
    """A result entry for a readable JSON: metrics to 6 digits, times (``*seconds``) to ms."""
    metric_keys = set(metric_keys)
    out = {}
    for key, value in entry.items():
        if key in metric_keys:
            out[key] = clean_number(value, 6)
        elif key.endswith("seconds"):
            out[key] = clean_number(value, 3)
        else:
            out[key] = value
    return out
