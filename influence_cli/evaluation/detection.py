"""``infl evaluate --noise F``: how well does each ranking find labels flipped on purpose?

Recipe: flip a seeded fraction of the training labels (``data.label_noise``), train on the
noisy labels, rank the training set by each strategy's self-influence and by two cheap
baselines, and score every ranking against the known flips.

- The noisy run lives in its own run directory, ``<output.dir>/<name>-noise<F>-<kind>/``,
  so it never clashes with the clean run; the pipeline caches its checkpoint and factors
  there like for any run (stale factors in that directory are refitted automatically).
- Baselines: ``loss`` is the per-example training cross-entropy (against the noisy
  labels); ``gradient_norm`` is the squared norm of the per-example gradient of the
  tracked layers, ‖g_i‖². That is exactly self-influence with the identity strategy
  (the registry's ``Identity`` class, P = I), so it reuses those scores when identity is
  evaluated anyway.
- Metrics per ranking (higher = more suspicious): AUROC, average precision, precision@k
  with k = the number of flipped labels, recall in the top 5/10/20 % of the ranking, and
  the wall time (for strategies: fitting the factors, as recorded when they were fitted,
  plus scoring every training example).

Outputs: ``evaluation.json`` (the returned dict) and ``evaluation_scores.csv`` (every
example's scores, the given and original labels and the flip mask), both written
atomically into the noisy run directory.
"""

from __future__ import annotations

import io
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from influence_cli.engine.batches import forward_logits
from influence_cli import __version__
from influence_cli.config import Config
from influence_cli.errors import InflError
from influence_cli.loaders import BatchLoader
from influence_cli.progress import Reporter
from influence_cli.run import atomic_write_json, atomic_write_text

from .common import (
    Stopwatch,
    clean_number,
    derived_config,
    json_safe,
    resolve_auto,
    resolve_strategies,
    rounded_entry,
    score_strategies,
    score_strategy,
)
from .metrics import auroc, average_precision, precision_at_k, recall_at_fraction

__all__ = [
    "RECALL_FRACTIONS",
    "METRIC_KEYS",
    "noisy_config",
    "detection_metrics",
    "per_example_loss",
    "gradient_norm_strategy",
    "evaluate_noise_detection",
]

RECALL_FRACTIONS = (0.05, 0.10, 0.20)
METRIC_KEYS = (
    "auroc",
    "average_precision",
    "precision_at_k",
    "recall_at_5pct",
    "recall_at_10pct",
    "recall_at_20pct",
)
BASELINES = ("loss", "margin", "gradient_norm")
# The audit.score rankings that depend on the curvature (evaluated for every strategy).
STRATEGY_SCORES = ("self_influence", "loo_loss", "relabel_gain", "loo_margin", "loo_margin_sm")
NOISE_KINDS = ("uniform", "class_conditional")


def noisy_config(config: Config, fraction: float, kind: str = "uniform") -> Config:
    """The config with ``data.label_noise = {fraction, kind, seed: config.seed}`` and the
    run name ``<name>-noise<fraction>-<kind>``."""
    name = f"{config.name}-noise{float(fraction):g}-{kind}"
    noise = {"fraction": float(fraction), "kind": kind, "seed": int(config.seed)}
    return derived_config(config, name=name, updates={"data.label_noise": noise})


def gradient_norm_strategy() -> str:
    """The registered name of the P = I strategy (``engine.strategies.identity.Identity``):
    its self-influence is the gradient-norm baseline ‖g_i‖²."""
    from influence_cli.engine import STRATEGIES
    from influence_cli.engine.strategies.identity import Identity

    return next((name for name, cls in STRATEGIES.items() if cls is Identity), Identity.name)


def detection_metrics(scores: Any, flipped: Any) -> dict[str, float]:
    """Every detection metric of one ranking (higher score = more suspicious)."""
    flipped = np.asarray(flipped, dtype=bool)
    k = int(flipped.sum())
    out = {
        "auroc": auroc(scores, flipped),
        "average_precision": average_precision(scores, flipped),
        "precision_at_k": precision_at_k(scores, flipped, k),
    }
    for fraction in RECALL_FRACTIONS:
        out[f"recall_at_{round(fraction * 100)}pct"] = recall_at_fraction(scores, flipped, fraction)
    return out


@torch.no_grad()
def per_example_loss(model: torch.nn.Module, dataset: Any, batch_size: int = 512) -> np.ndarray:
    """Cross-entropy of every example against its given label, in dataset order (float64)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for x, y, _idx in BatchLoader(dataset, batch_size):
        logits = forward_logits(model, x.to(device)).double()
        out.append(F.cross_entropy(logits, y.to(device), reduction="none").cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


@torch.no_grad()
def per_example_margin(model: torch.nn.Module, dataset: Any, batch_size: int = 512) -> np.ndarray:
    """log p(y'|x) − log p(y|x) = z_y' − z_y for the most probable other class y' (float64):
    the ``margin`` score of ``audit.scores``, > 0 where the model prefers another class."""
    from influence_cli.engine.mislabel import alternative_labels

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for x, y, _idx in BatchLoader(dataset, batch_size):
        logits, y = model(x.to(device)).double(), y.to(device)
        other = alternative_labels(logits, y)
        rows = torch.arange(len(y), device=device)
        out.append((logits[rows, other] - logits[rows, y]).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def _noisy_session(config: Config, fraction: float, kind: str, reporter: Reporter) -> Any:
    """The checked arguments' session on the noisy run (the labels flipped, some kept)."""
    from influence_cli.app import Session

    if not 0.0 < float(fraction) < 1.0:
        raise InflError(f"evaluate --noise: {fraction} is not a fraction in (0, 1); use e.g. --noise 0.1")
    if kind not in NOISE_KINDS:
        raise InflError(f"evaluate: unknown noise kind '{kind}'; use {' or '.join(NOISE_KINDS)}")
    if config.model.checkpoint:
        raise InflError(
            "evaluate --noise trains a model on the noisy labels, so it cannot use model.checkpoint; "
            "remove model.checkpoint (e.g. --set model.checkpoint=null) to evaluate with the configured training"
        )
    session = Session(noisy_config(config, fraction, kind), reporter)
    data = session.data()
    if data.noise is None or not bool(data.noise.flipped.any()):
        raise InflError(
            f"evaluate --noise {fraction}: no label was flipped in {len(data.train)} training examples; use a larger fraction"
        )
    if bool(data.noise.flipped.all()):
        raise InflError(f"evaluate --noise {fraction}: every label was flipped; use a smaller fraction")
    return session


def evaluate_noise_detection(
    config: Config,
    *,
    fraction: float = 0.1,
    kind: str = "uniform",
    strategies: Optional[Iterable[str]] = None,
    reporter: Optional[Reporter] = None,
) -> dict[str, Any]:
    """Inject label noise, train on it, and measure how well each ranking finds the flips.

    strategies: names from ``available_strategies()``; default every registered strategy
    except the very slow ones (see ``common.default_strategies``). A strategy that raises
    an InflError/InfluenceError (e.g. too big for ``exact``) or runs out of memory is
    recorded as ``{"skipped": reason}`` and the others go on.
    Returns the JSON-serialisable result that is also written to evaluation.json.
    """
    from influence_cli.app import ensure_members

    names = resolve_strategies(strategies)
    reporter = reporter or Reporter()
    total = Stopwatch()
    session = _noisy_session(config, fraction, kind, reporter)
    names = resolve_auto(session, names)
    data = session.data()
    flipped = data.noise.flipped.numpy().astype(bool)
    members = ensure_members(session)
    columns: dict[str, np.ndarray] = {}
    rankings: dict[str, dict[str, Any]] = {}
    for outcome in score_strategies(members, names, _self_influence(members), reporter):
        rankings.update(_strategy_rankings(outcome, flipped, columns))
    rankings.update(_baselines(members, data.train, flipped, columns, rankings))
    default = _default_ranking(session, members, names, flipped, columns, rankings, reporter)
    order = {"strategy": 0, "score": 1, "baseline": 2}
    rankings = dict(sorted(rankings.items(), key=lambda item: order.get(item[1].get("type"), 3)))
    run = session.run
    run.ensure()
    predicted = _write_scores_csv(run.root / "evaluation_scores.csv", members, data, columns)
    result = _detection_result(config, session, members, predicted, names, rankings)
    result["default"] = rounded_entry(default, METRIC_KEYS)
    result["seconds"] = clean_number(total(), 3)
    result = json_safe(result)
    if session.dist.is_main:
        atomic_write_json(run.root / "evaluation.json", result)
    return result


def _self_influence(members: list) -> Any:
    from influence_cli.app.scores import members_mislabel_scores

    return lambda name, fstates: members_mislabel_scores(members, name, fstates=fstates)[0]


def _plain_self_influence(members: list) -> Any:
    from influence_cli.app import members_self_influence

    return lambda name, fstates: members_self_influence(members, name, fstates=fstates)[0]


def _strategy_rankings(outcome: Any, flipped: np.ndarray, columns: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """A strategy's rankings entries: its self-influence under its own name and every other
    curvature-dependent ``audit.score`` as ``<strategy>:<score>`` (all join ``columns``)."""
    name = outcome.name
    if outcome.skipped is not None:
        return {name: {"type": "strategy", "skipped": outcome.skipped}}
    if not all(np.all(np.isfinite(v)) for v in outcome.value.values()):
        return {name: {"type": "strategy", "skipped": "non-finite self-influence (raise influence.damping)"}}
    out = {}
    for score in STRATEGY_SCORES:
        key = name if score == "self_influence" else f"{name}:{score}"
        values = outcome.value[score]
        columns[key] = values
        kind = {"type": "strategy"} if score == "self_influence" else {"type": "score", "strategy": name, "score": score}
        out[key] = {**kind, **detection_metrics(values, flipped), **outcome.timings()}
    return out


def _default_ranking(session: Any, members: list, names: list[str], flipped: np.ndarray,
                     columns: dict[str, np.ndarray], rankings: dict[str, dict[str, Any]], reporter: Reporter) -> dict[str, Any]:
    """The ranking the audit commands flag by (``influence.strategy`` resolved, ``audit.score``):
    which entry of ``rankings`` it is, scored now when that strategy was not evaluated."""
    from influence_cli.app.choice import resolve_strategy

    strategy, score = resolve_strategy(session), session.config.audit.score
    key = score if score in BASELINES else (strategy if score == "self_influence" else f"{strategy}:{score}")
    if key not in rankings:
        outcome = score_strategy(members, strategy, _self_influence(members), reporter)
        rankings.update(_strategy_rankings(outcome, flipped, columns))
    entry = rankings.get(key) or rankings[strategy]
    choice = session.strategy_choice
    return {"strategy": strategy, "score": score, "ranking": key, "strategy_reason": choice.reason if choice else None,
            **{k: entry.get(k) for k in ("skipped", *METRIC_KEYS) if k in entry}}


def _baselines(members: list, train: Any, flipped: np.ndarray, columns: dict[str, np.ndarray],
               rankings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The loss and gradient-norm rankings (their columns join ``columns``)."""
    # Baseline 1: the training loss against the (noisy) given labels (ensemble: the mean).
    watch = Stopwatch()
    losses = sum(per_example_loss(m.state.model, train) for m in members) / len(members)
    out = {"loss": {"type": "baseline", **detection_metrics(losses, flipped), "seconds": watch()}}
    columns["loss"] = losses
    watch = Stopwatch()
    margins = sum(per_example_margin(m.state.model, train) for m in members) / len(members)
    out["margin"] = {"type": "baseline", **detection_metrics(margins, flipped), "seconds": watch()}
    columns["margin"] = margins
    # Baseline 2: ‖g_i‖² of the tracked layers = self-influence with the identity strategy.
    identity = gradient_norm_strategy()
    if identity in columns:
        same = rankings[identity]
        values, metrics, seconds = columns[identity], {key: same[key] for key in METRIC_KEYS}, same["score_seconds"]
    else:
        outcome = score_strategy(members, identity, _plain_self_influence(members), Reporter())
        if outcome.skipped is not None:
            out["gradient_norm"] = {"type": "baseline", "skipped": outcome.skipped}
            return out
        values, metrics, seconds = outcome.value, detection_metrics(outcome.value, flipped), outcome.timings()["seconds"]
    columns["gradient_norm"] = values
    out["gradient_norm"] = {"type": "baseline", **metrics, "seconds": seconds, "same_as": identity}
    return out


def _write_scores_csv(path: Any, members: list, data: Any, columns: dict[str, np.ndarray]) -> np.ndarray:
    """evaluation_scores.csv: every example's labels, flip mask, prediction and scores;
    returns the (ensemble's) predicted training labels."""
    import pandas as pd
    from influence_cli.app import members_probs

    predicted = members_probs(members, data.train).argmax(1)
    ids = data.train.ids
    frame = pd.DataFrame(
        {
            "index": np.arange(len(ids)),
            "id": ids,
            "label": data.train.labels.numpy(),
            "original_label": data.noise.original_labels.numpy(),
            "flipped": data.noise.flipped.numpy().astype(bool),
            "predicted": predicted,
        }
    )
    for name, values in columns.items():
        frame[name] = values  # full precision: pandas writes floats with repr
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    atomic_write_text(path, buffer.getvalue())
    return predicted


def _detection_result(config: Config, session: Any, members: list, predicted: np.ndarray, names: list[str],
                      rankings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON-ready result (evaluation.json), metrics to 6 digits and times to ms."""
    from influence_cli.app import members_probs

    data, state, noise = session.data(), members[0].state, session.config.data.label_noise
    given, original = data.train.labels.numpy(), data.noise.original_labels.numpy()
    flipped = data.noise.flipped.numpy().astype(bool)
    n, k = len(flipped), int(flipped.sum())
    test_predicted = members_probs(members, data.test).argmax(1)
    model = {
        "trained_now": state.trained_now,
        "train_seconds": state.info.get("train_seconds"),
        "train_accuracy_noisy_labels": float((predicted == given).mean()),
        "train_accuracy_original_labels": float((predicted == original).mean()),
        "flipped_memorised": float((predicted[flipped] == given[flipped]).mean()),
        "test_accuracy": float((test_predicted == data.test.labels.numpy()).mean()),
    }
    chance = {
        "auroc": 0.5,
        "average_precision": k / n,
        "precision_at_k": k / n,
        **{f"recall_at_{round(f * 100)}pct": min(1.0, f) for f in RECALL_FRACTIONS},
    }
    return {
        "evaluation": "noise_detection",
        "config": config.name,
        "run": session.config.name,
        "run_dir": str(session.run.root),
        "noise": {"fraction": float(noise.fraction), "kind": noise.kind, "seed": int(noise.seed)},
        "examples": n,
        "flipped": k,
        "k": k,
        "ensemble": len(members),
        "model": {key: clean_number(v, 6) if isinstance(v, float) else v for key, v in model.items()},
        "chance": {key: clean_number(v, 6) for key, v in chance.items()},
        "strategies": list(names),
        "baselines": list(BASELINES),
        "rankings": {name: rounded_entry(entry, METRIC_KEYS) for name, entry in rankings.items()},
        "scores_csv": str(session.run.root / "evaluation_scores.csv"),
        "seconds": None,
        "version": __version__,
    }
