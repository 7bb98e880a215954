"""`infl evaluate --fix`: the fixing curve on injected label noise (Koh & Liang 2017, Fig. 6).

Train on noisy labels; check training examples in the order of each ranking (every
requested strategy's self-influence, the training loss, a random order) at 5 … 30 % of
the training set; an oracle restores the flipped labels among the checked ones. For every
ranking and fraction: the share of flips found, the test accuracy after retraining from
scratch on the fixed labels, and after the influence relabel correction of the noisy model
(app.correct; strategy rankings use their own factors, the baselines those of the first
strategy that ran). Clean and noisy accuracy for reference; the cost of a correction
against one retraining, both measured in this run.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterable, Optional

import numpy as np
import torch

from influence_cli import __version__
from influence_cli.config import Config
from influence_cli.errors import InflError
from influence_cli.progress import Reporter
from influence_cli.run import atomic_write_json

from .common import Stopwatch, clean_number, json_safe, resolve_strategies, score_strategies
from .detection import _noisy_session, per_example_loss

FIX_FRACTIONS = (0.05, 0.10, 0.15, 0.20, 0.25, 0.30)


def checked_rows(order: np.ndarray, fraction: float) -> np.ndarray:
    """The first ceil(fraction · n) rows of a ranking (most suspicious first)."""
    return order[: int(math.ceil(float(fraction) * len(order)))]


def flips_found(order: np.ndarray, flipped: np.ndarray, fraction: float) -> np.ndarray:
    """Training rows among the checked ones whose labels were flipped (sorted)."""
    rows = checked_rows(order, fraction)
    return np.sort(rows[flipped[rows]])


class _Retrainer:
    """Retrains on a fixed label set once per distinct set (rankings often agree)."""

    def __init__(self, session: Any, reporter: Reporter):
        self.session, self.reporter = session, reporter
        self.cache: dict[str, float] = {}
        self.seconds: list[float] = []

    def accuracy(self, rows: np.ndarray, labels: torch.Tensor) -> float:
        from influence_cli.app.correct import corrected_train_set, retrain, split_metrics

        key = hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()
        if key not in self.cache:
            data = self.session.data()
            train = corrected_train_set(data.train, torch.as_tensor(rows), "relabel", labels)
            model, seconds = retrain(data, train, self.session.config, seed=self.session.model_seed)
            self.seconds.append(seconds)
            self.cache[key] = split_metrics(model, data.test)["accuracy"]
        return self.cache[key]


def _curve(session: Any, state: Any, factors: Any, order: np.ndarray, retrainer: _Retrainer,
           fractions: Iterable[float], costs: list[float]) -> list[dict[str, Any]]:
    """One ranking's rows: flips found, retrained and corrected test accuracy per fraction."""
    from influence_cli.app.correct import correct, split_metrics
    from influence_cli.app.factors import influence_device, train_loader

    data = session.data()
    flipped = data.noise.flipped.numpy().astype(bool)
    original = data.noise.original_labels
    loader = train_loader(session, int(session.config.influence.batch_size), (0, len(data.train)))
    out = []
    for fraction in fractions:
        rows = flips_found(order, flipped, fraction)
        labels = original[torch.as_tensor(rows, dtype=torch.long)]
        entry = {"fraction": fraction, "checked": int(len(checked_rows(order, fraction))), "fixed": int(len(rows)),
                 "flips_found": float(len(rows) / max(1, flipped.sum()))}
        entry["retrained_accuracy"] = retrainer.accuracy(rows, labels) if len(rows) else state.test_accuracy
        if len(rows):
            fixed = correct(state.model, factors, data.train, torch.as_tensor(rows, dtype=torch.long), action="relabel",
                            new_labels=labels, config=session.config, loader=loader,
                            device=influence_device(session.config))
            state.model.cpu()
            costs.append(fixed.seconds)
            entry.update(corrected_accuracy=split_metrics(fixed.model, data.test)["accuracy"],
                         step_scale=fixed.result.scale, correction_seconds=fixed.seconds)
        else:
            entry.update(corrected_accuracy=state.test_accuracy, step_scale=None, correction_seconds=None)
        out.append({k: clean_number(v, 3 if k.endswith("seconds") else 6) if isinstance(v, float) else v
                    for k, v in entry.items()})
    return out


def evaluate_fixing(
    config: Config, *, fraction: float = 0.1, kind: str = "uniform", strategies: Optional[Iterable[str]] = None,
    reporter: Optional[Reporter] = None, fractions: Iterable[float] = FIX_FRACTIONS,
) -> dict[str, Any]:
    """The fixing curve of every ranking; written to runs/<noisy run>/fixing.json."""
    from influence_cli.app import ensure_members, members_self_influence
    from influence_cli.app.correct import corrected_train_set, retrain, split_metrics

    names = resolve_strategies(strategies)
    reporter = reporter or Reporter()
    fractions = [float(f) for f in fractions]
    total = Stopwatch()
    if config.influence.ensemble_size() > 1:  # the curve corrects and retrains one model
        reporter.info(f"evaluate --fix measures one model: influence.ensemble {config.influence.ensemble_size()} → 1")
        config = config.model_copy(update={"influence": config.influence.model_copy(update={"ensemble": 1})})
    session = _noisy_session(config, fraction, kind, reporter)
    data = session.data()
    members = ensure_members(session)
    state = members[0].state
    retrainer = _Retrainer(session, reporter)
    costs: list[float] = []
    rankings: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    baseline_factors, baseline_strategy = None, None

    def run_curve(name: str, fstates: list) -> tuple[list[dict[str, Any]], Any]:
        scores = members_self_influence(members, name, fstates=fstates)[0]
        order = np.argsort(-scores, kind="stable")
        reporter.info(f"fixing curve: {name} ({len(fractions)} fractions, a retraining and a correction each)")
        return _curve(session, state, fstates[0].factors, order, retrainer, fractions, costs), fstates[0].factors

    for outcome in score_strategies(members, names, run_curve, reporter):
        if outcome.skipped is not None:
            skipped[outcome.name] = outcome.skipped
            continue
        rankings[outcome.name], factors = outcome.value
        if baseline_factors is None:
            baseline_factors, baseline_strategy = factors, outcome.name
    if baseline_factors is None:
        raise InflError("evaluate --fix: every strategy was skipped; the correction needs one fitted strategy")
    losses = per_example_loss(state.model, data.train)
    random = np.random.default_rng(int(config.seed)).permutation(len(data.train))
    for name, order in (("loss", np.argsort(-losses, kind="stable")), ("random", random)):
        rankings[name] = _curve(session, state, baseline_factors, order, retrainer, fractions, costs)
    clean_train = corrected_train_set(data.train, torch.arange(len(data.train)), "relabel", data.noise.original_labels)
    clean_model, clean_seconds = retrain(data, clean_train, session.config, seed=session.model_seed)
    retrainer.seconds.append(clean_seconds)
    result = _result(config, session, state, rankings, skipped, names, fractions, costs, retrainer,
                     split_metrics(clean_model, data.test)["accuracy"], baseline_strategy)
    result["seconds"] = clean_number(total(), 3)
    result = json_safe(result)
    atomic_write_json(session.run.root / "fixing.json", result)
    return result


def _result(config: Config, session: Any, state: Any, rankings: dict, skipped: dict, names: list, fractions: list,
            costs: list[float], retrainer: _Retrainer, clean_accuracy: float, baseline_strategy: str) -> dict[str, Any]:
    noise = session.config.data.label_noise
    correction = float(np.mean(costs)) if costs else float("nan")
    retraining = float(np.mean(retrainer.seconds))
    by_ranking = {}
    for name, rows in rankings.items():
        times = [r["correction_seconds"] for r in rows if r.get("correction_seconds") is not None]
        if times:
            by_ranking[name] = {"correction_seconds": clean_number(np.mean(times), 3),
                                "ratio": clean_number(np.mean(times) / retraining, 4)}
    return {
        "evaluation": "fixing", "config": config.name, "name": session.config.name, "run_dir": str(session.run.root),
        "noise": {"fraction": float(noise.fraction), "kind": noise.kind, "seed": int(noise.seed)},
        "examples": len(session.data().train), "flipped": int(session.data().noise.flipped.sum()),
        "fractions": fractions, "strategies": names, "baselines": ["loss", "random"],
        "baseline_correction_strategy": baseline_strategy,
        "reference": {"clean_accuracy": clean_accuracy, "noisy_accuracy": state.test_accuracy},
        "rankings": rankings, "skipped": skipped,
        "cost": {"correction_seconds": clean_number(correction, 3), "retraining_seconds": clean_number(retraining, 3),
                 "ratio": clean_number(correction / retraining, 4), "corrections": len(costs),
                 "retrainings": len(retrainer.seconds), "by_ranking": by_ranking},
        "version": __version__,
    }
