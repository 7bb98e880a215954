"""``infl evaluate --noise F``: how well does each ranking find labels flipped on purpose?

Recipe: flip a seeded fraction of the training labels (``data.label_noise``), train on the
noisy labels, rank the training set by each strategy's self-influence and by two cheap
baselines, and score every ranking against the known flips.

- The noisy run lives in its own run directory, ``<output.dir>/<name>-noise<F>-<kind>/``,
  so it never clashes with the clean run; the pipeline caches its checkpoint and factors
  there like for any run (stale factors in that directory are refitted automatically).
- Baselines: ``loss`` is the per-example training cross-entropy (against the noisy
  labels); ``gradient_norm`` is the squared norm of the per-example gradient of the
  tracked layers, ‖g_i‖². That is exactly self-influence with the ``identity`` strategy
  (P = I), so it reuses those scores when identity is evaluated anyway.
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
import time
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

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
    fmt,
    fmt_seconds,
    json_safe,
    resolve_strategies,
    timed_factors,
)
from .metrics import auroc, average_precision, precision_at_k, recall_at_fraction

__all__ = [
    "RECALL_FRACTIONS",
    "METRIC_KEYS",
    "noisy_config",
    "detection_metrics",
    "per_example_loss",
    "evaluate_noise_detection",
    "render_detection_table",
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
BASELINES = ("loss", "gradient_norm")
NOISE_KINDS = ("uniform", "class_conditional")


def noisy_config(config: Config, fraction: float, kind: str = "uniform") -> Config:
    """The config with ``data.label_noise = {fraction, kind, seed: config.seed}`` and the
    run name ``<name>-noise<fraction>-<kind>``."""
    name = f"{config.name}-noise{float(fraction):g}-{kind}"
    noise = {"fraction": float(fraction), "kind": kind, "seed": int(config.seed)}
    return derived_config(config, name=name, updates={"data.label_noise": noise})


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
        logits = model(x.to(device)).double()
        out.append(F.cross_entropy(logits, y.to(device), reduction="none").cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def _is_memory_error(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate" in text)


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
    from influence_cli.pipeline import Session, ensure_members, members_probs, members_self_influence

    if not 0.0 < float(fraction) < 1.0:
        raise InflError(f"evaluate --noise: {fraction} is not a fraction in (0, 1); use e.g. --noise 0.1")
    if kind not in NOISE_KINDS:
        raise InflError(f"evaluate: unknown noise kind '{kind}'; use {' or '.join(NOISE_KINDS)}")
    if config.model.checkpoint:
        raise InflError(
            "evaluate --noise trains a model on the noisy labels, so it cannot use model.checkpoint; "
            "remove model.checkpoint (e.g. --set model.checkpoint=null) to evaluate with the configured training"
        )
    names = resolve_strategies(strategies)
    reporter = reporter or Reporter()
    total = Stopwatch()
    noisy = noisy_config(config, fraction, kind)
    session = Session(noisy, reporter)
    data = session.data()
    if data.noise is None or not bool(data.noise.flipped.any()):
        raise InflError(
            f"evaluate --noise {fraction}: no label was flipped in {len(data.train)} training examples; use a larger fraction"
        )
    flipped = data.noise.flipped.numpy().astype(bool)
    n, k = len(flipped), int(flipped.sum())
    if k == n:
        raise InflError(f"evaluate --noise {fraction}: every label was flipped; use a smaller fraction")

    members = ensure_members(session)
    state = members[0].state

    columns: dict[str, np.ndarray] = {}
    rankings: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            fit_seconds, factors_reused, fstates = 0.0, True, []
            for member in members:  # fit (or reuse) first, so the scoring time is scoring only
                tf = timed_factors(member.session, member.state, name)
                fit_seconds += tf.fit_seconds
                factors_reused = factors_reused and tf.reused
                fstates.append(tf.state)
            start = time.perf_counter()
            values, _ = members_self_influence(members, name, fstates=fstates)
            score_seconds = time.perf_counter() - start
        except InflError as exc:  # InfluenceError, FactorsError, ... are InflErrors
            rankings[name] = {"type": "strategy", "skipped": str(exc)}
            reporter.warn(f"{name}: skipped: {exc}")
            continue
        except (MemoryError, RuntimeError) as exc:
            if not _is_memory_error(exc):
                raise
            rankings[name] = {"type": "strategy", "skipped": f"out of memory: {exc}".strip()}
            reporter.warn(f"{name}: skipped: out of memory")
            continue
        finally:
            for member in members:
                member.state.model.cpu()
        if not np.all(np.isfinite(values)):
            rankings[name] = {"type": "strategy", "skipped": "non-finite self-influence (raise influence.damping)"}
            continue
        columns[name] = values
        rankings[name] = {
            "type": "strategy",
            **detection_metrics(values, flipped),
            "seconds": fit_seconds + score_seconds,
            "fit_seconds": fit_seconds,
            "score_seconds": score_seconds,
            "factors_reused": factors_reused,
        }

    # Baseline 1: the training loss against the (noisy) given labels (ensemble: the mean).
    start = time.perf_counter()
    losses = sum(per_example_loss(m.state.model, data.train) for m in members) / len(members)
    loss_seconds = time.perf_counter() - start
    columns["loss"] = losses
    rankings["loss"] = {"type": "baseline", **detection_metrics(losses, flipped), "seconds": loss_seconds}

    # Baseline 2: ‖g_i‖² of the tracked layers = self-influence with the identity strategy.
    if "identity" in columns:
        rankings["gradient_norm"] = {
            "type": "baseline",
            **{key: rankings["identity"][key] for key in METRIC_KEYS},
            "seconds": rankings["identity"]["score_seconds"],
            "same_as": "identity",
        }
        columns["gradient_norm"] = columns["identity"]
    else:
        try:
            start = time.perf_counter()
            norms, _ = members_self_influence(members, "identity")
            seconds = time.perf_counter() - start
            columns["gradient_norm"] = norms
            rankings["gradient_norm"] = {
                "type": "baseline",
                **detection_metrics(norms, flipped),
                "seconds": seconds,
                "same_as": "identity",
            }
        except InflError as exc:
            rankings["gradient_norm"] = {"type": "baseline", "skipped": str(exc)}
        finally:
            for member in members:
                member.state.model.cpu()

    predicted = members_probs(members, data.train).argmax(1)
    given = data.train.labels.numpy()
    original = data.noise.original_labels.numpy()
    run = session.run
    run.ensure()
    csv_path = run.root / "evaluation_scores.csv"
    _write_scores_csv(csv_path, data.train.ids, given, original, flipped, predicted, columns)

    result = {
        "evaluation": "noise_detection",
        "config": config.name,
        "run": noisy.name,
        "run_dir": str(run.root),
        "noise": {"fraction": float(fraction), "kind": kind, "seed": int(config.seed)},
        "examples": n,
        "flipped": k,
        "k": k,
        "ensemble": len(members),
        "model": {
            "trained_now": state.trained_now,
            "train_seconds": state.info.get("train_seconds"),
            "train_accuracy_noisy_labels": float((predicted == given).mean()),
            "train_accuracy_original_labels": float((predicted == original).mean()),
            "flipped_memorised": float((predicted[flipped] == given[flipped]).mean()),
            "test_accuracy": float((members_probs(members, data.test).argmax(1) == data.test.labels.numpy()).mean()),
        },
        "chance": {
            "auroc": 0.5,
            "average_precision": k / n,
            "precision_at_k": k / n,
            **{f"recall_at_{round(f * 100)}pct": min(1.0, f) for f in RECALL_FRACTIONS},
        },
        "strategies": [name for name in names],
        "baselines": list(BASELINES),
        "rankings": rankings,
        "scores_csv": str(csv_path),
        "seconds": total(),
        "version": __version__,
    }
    result = json_safe(_rounded(result))
    if session.dist.is_main:
        atomic_write_json(run.root / "evaluation.json", result)
    return result


def _rounded(result: dict[str, Any]) -> dict[str, Any]:
    """Round metric and time values for a readable JSON (metrics: 6 digits; times: ms)."""
    for entry in result["rankings"].values():
        for key, value in list(entry.items()):
            if key in METRIC_KEYS:
                entry[key] = clean_number(value, 6)
            elif key.endswith("seconds"):
                entry[key] = clean_number(value, 3)
    result["chance"] = {key: clean_number(v, 6) for key, v in result["chance"].items()}
    result["seconds"] = clean_number(result["seconds"], 3)
    for key, value in result["model"].items():
        if isinstance(value, float):
            result["model"][key] = clean_number(value, 6)
    return result


def _write_scores_csv(path: Any, ids: list[str], given: np.ndarray, original: np.ndarray, flipped: np.ndarray,
                      predicted: np.ndarray, columns: dict[str, np.ndarray]) -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "index": np.arange(len(ids)),
            "id": ids,
            "label": given,
            "original_label": original,
            "flipped": flipped,
            "predicted": predicted,
        }
    )
    for name, values in columns.items():
        frame[name] = values  # full precision: pandas writes floats with repr
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    atomic_write_text(path, buffer.getvalue())


# ----------------------------------------------------------------------------- rendering

_COLUMNS = (
    ("AUROC", "auroc"),
    ("AP", "average_precision"),
    ("P@k", "precision_at_k"),
    ("R@5%", "recall_at_5pct"),
    ("R@10%", "recall_at_10pct"),
    ("R@20%", "recall_at_20pct"),
)


def render_detection_table(result: dict[str, Any], console: Any) -> None:
    """Print the detection result as a rich table (one row per ranking, chance last)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    noise = result["noise"]
    title = (
        f"Label-noise detection — {result['config']}: {100 * noise['fraction']:g} % {noise['kind']} noise, "
        f"{result['flipped']} of {result['examples']} training labels flipped (k = {result['k']})"
    )
    table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold", title_style="bold", pad_edge=False)
    table.add_column("ranking", no_wrap=True)
    for header, _key in _COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    skipped, notes = [], []
    previous_type = None
    for name, entry in result["rankings"].items():
        if previous_type is not None and entry.get("type") != previous_type:
            table.add_section()
        previous_type = entry.get("type")
        if entry.get("same_as"):
            notes.append(f"{name} = self-influence with {entry['same_as']} (‖g_i‖², P = I)")
        if "skipped" in entry:
            skipped.append((name, entry["skipped"]))
            table.add_row(escape(name), "[yellow]skipped[/]", *["—"] * (len(_COLUMNS) - 1), "—")
            continue
        table.add_row(escape(name), *[fmt(entry.get(key)) for _h, key in _COLUMNS], fmt_seconds(entry.get("seconds")))
    chance = result.get("chance", {})
    table.add_section()
    table.add_row("random (chance)", *[fmt(chance.get(key)) for _h, key in _COLUMNS], "", style="dim")
    console.print(table)
    model = result.get("model", {})
    if model:
        console.print(
            f"noisy model: test accuracy {fmt(model.get('test_accuracy'))}, "
            f"memorised {fmt(100 * (model.get('flipped_memorised') or 0), 1)} % of the flipped labels; "
            f"time = fitting the factors + scoring all {result['examples']} examples",
            highlight=False,
        )
    for note in notes:
        console.print(escape(note), highlight=False)
    for name, reason in skipped:
        console.print(f"[yellow]{escape(name)} skipped:[/] {escape(str(reason))}", highlight=False)
