"""``infl evaluate --value K``: does dropping the K training examples `infl value` calls most
harmful improve the model more than dropping K random or the K highest-loss ones?

Recipe:

1. The run: the config's (with ``--noise F``, its noisy copy ``<name>-noise<F>-<kind>``, the
   labels flipped as for noise detection); its full-data model(s) come from the pipeline.
2. The test split is cut in two by a permutation seeded with ``config.seed``: the first
   ⌈T/2⌉ rows are the **validation** set — the query set whose value ranks the training
   examples — and the other rows the **held-out** set, which chose nothing. The
   improvement that counts is the held-out one.
3. Rankings of the training set (first = dropped first): ``most_harmful`` — most negative
   value_i = Σ_{t∈validation} g_tᵀ(H + λI)⁻¹g_i (``members_value``, loss measurement);
   ``highest_loss`` — the full model's per-example training cross-entropy against the
   given labels (ensemble mean); ``random`` — a permutation seeded with ``config.seed``
   (the first K of the same permutation for every K).
4. For each K and ranking, its first K examples are dropped and a fresh model is trained
   with the config's recipe for seeds ``config.seed + s``, s < ``seeds``; the full-data
   reference is retrained with the same seeds. Mean cross-entropy and accuracy on both
   halves are averaged over the seeds (``std``: their spread). Each retraining is cached,
   sealed, in ``runs/<name>/value_eval/<key>.json`` (key: training hash, dropped indices,
   seed, rows), so a rerun or another K reuses it.

Output: ``runs/<name>/value_evaluation.json`` (the returned dict; each entry lists the
dropped training indices and, on a noisy run, how many of them had a flipped label).
Under torchrun every rank retrains everything (the jobs are not dealt out).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from influence_cli import __version__
from influence_cli.errors import InflError
from influence_cli.progress import Reporter
from influence_cli.run import atomic_write_json, hash_object, is_sealed, read_json, seal, training_hash

from .common import Stopwatch, clean_number, json_safe
from .retraining import train_subset

__all__ = ["METHODS", "evaluate_value", "loss_accuracy", "parse_k", "split_halves"]

METHODS = ("most_harmful", "random", "highest_loss")
METRICS = ("validation_loss", "validation_accuracy", "heldout_loss", "heldout_accuracy")


def parse_k(text: Any, n: int) -> int:
    """K from a count ("29") or a fraction ("0.05", "5%") of the ``n`` training examples."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise InflError(f"--value: '{raw}' is neither a count nor a fraction; use e.g. 50, 0.05 or 5%") from None
    if raw.endswith("%") or (0 < value < 1 and "." in raw):
        if not 0 < value < 1:
            raise InflError(f"--value: {raw} is not a fraction in (0, 1)")
        k = round(value * n)
    elif value.is_integer():
        k = int(value)
    else:
        raise InflError(f"--value: {raw} is neither a whole count nor a fraction in (0, 1)")
    if not 1 <= k < n:
        raise InflError(f"--value: {raw} gives K = {k}, but K must lie in 1..{n - 1} ({n} training examples)")
    return k


def split_halves(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation, held-out) row indices of the test split: a seeded permutation cut at ⌈T/2⌉."""
    if rows < 2:
        raise InflError(f"evaluate --value: the test split has {rows} row(s); it needs 2 or more to cut in two halves")
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x7A1]).permutation(rows)
    cut = (rows + 1) // 2
    return np.sort(order[:cut]), np.sort(order[cut:])


@torch.no_grad()
def loss_accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on the rows."""
    model.eval()
    logits = torch.cat([model(inputs[i : i + 512]).double() for i in range(0, len(inputs), 512)])
    labels = labels.long()
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).double().mean())


@dataclass
class Halves:
    """The validation and held-out halves of the test split."""

    val_x: torch.Tensor
    val_y: torch.Tensor
    held_x: torch.Tensor
    held_y: torch.Tensor
    ids: list[str]  # validation ids, then held-out ids (part of the cache key)


class Retrainer:
    """Retrain without a set of examples, measure both halves, cache the result."""

    def __init__(self, session: Any, halves: Halves):
        from influence_cli.training import resolve_device

        self.session, self.halves = session, halves
        self.config, self.data = session.config, session.data()
        self.cache_dir = session.run.root / "value_eval"
        self.base_hash = training_hash(self.config, session.data_fingerprint())
        self.device = resolve_device(self.config.train.device)
        self.trained_now = self.reused = 0
        self.seconds = 0.0

    def _path(self, dropped: np.ndarray, seed: int) -> Path:
        key = hash_object({"training_hash": self.base_hash, "dropped": dropped.tolist(), "seed": seed,
                           "rows": self.halves.ids})
        return self.cache_dir / f"{key}.json"

    def metrics(self, dropped: np.ndarray, seed: int) -> dict[str, float]:
        """The four metrics of a model trained without ``dropped`` (sorted indices)."""
        dropped = np.sort(np.asarray(dropped, dtype=np.int64))
        path = self._path(dropped, seed)
        cached = read_json(path)
        if cached and is_sealed(cached) and all(isinstance(cached.get(k), (int, float)) for k in METRICS):
            self.reused += 1
            return {k: float(cached[k]) for k in METRICS}
        start = time.perf_counter()
        keep = np.setdiff1d(np.arange(len(self.data.train)), dropped)
        model = train_subset(self.config, self.data, keep, seed, self.device)
        h = self.halves
        val_loss, val_acc = loss_accuracy(model, h.val_x, h.val_y)
        held_loss, held_acc = loss_accuracy(model, h.held_x, h.held_y)
        out = {"validation_loss": val_loss, "validation_accuracy": val_acc, "heldout_loss": held_loss,
               "heldout_accuracy": held_acc}
        if not all(math.isfinite(v) for v in out.values()):
            raise InflError("evaluate --value: a retraining gave a non-finite loss; lower train.lr")
        elapsed = time.perf_counter() - start
        self.trained_now += 1
        self.seconds += elapsed
        if self.session.dist.is_main:
            atomic_write_json(path, seal({**out, "seed": seed, "dropped": len(dropped), "train_seconds": elapsed}))
        return out


def _summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Mean and spread (std over seeds, 0 for one seed) of each metric."""
    out: dict[str, Any] = {}
    for key in METRICS:
        values = np.array([r[key] for r in runs], dtype=np.float64)
        out[key] = {"mean": clean_number(values.mean()), "std": clean_number(values.std(ddof=1) if len(values) > 1 else 0.0)}
    return out


def _rankings(members: list, session: Any, strategy: str, halves: Halves) -> dict[str, np.ndarray]:
    """Each method's order of the training set, the first dropped first."""
    from influence_cli.app.value import QuerySet, members_value
    from influence_cli.app.scores import predict_queries

    from .detection import per_example_loss

    data = session.data()
    val = QuerySet("the validation half", halves.val_x, halves.val_y, halves.val_y.numpy(),
                   predict_queries(members, halves.val_x))
    value = members_value(members, strategy, val, measurement="loss")
    if not np.all(np.isfinite(value)):
        raise InflError("evaluate --value: value scores are not finite; set influence.damping to a larger number")
    loss = np.mean([per_example_loss(m.state.model, data.train) for m in members], axis=0)
    rng = np.random.default_rng([int(session.config.seed) & 0xFFFFFFFF, 0x7A2])
    return {
        "most_harmful": np.argsort(value, kind="stable"),
        "random": rng.permutation(len(data.train)),
        "highest_loss": np.argsort(-loss, kind="stable"),
    }


def _value_session(config: Any, noise: Optional[float], noise_kind: str, reporter: Reporter) -> Any:
    from influence_cli.app import Session

    if noise is None:
        return Session(config, reporter)
    from .detection import _noisy_session

    return _noisy_session(config, noise, noise_kind, reporter)


def _halves(session: Any) -> Halves:
    test = session.data().test
    val, held = split_halves(len(test), session.config.seed)
    return Halves(test.inputs[val], test.labels[val], test.inputs[held], test.labels[held],
                  [test.ids[i] for i in val] + [test.ids[i] for i in held])


def evaluate_value(
    config: Any,
    *,
    ks: Iterable[Any],
    seeds: int = 1,
    strategy: Optional[str] = None,
    noise: Optional[float] = None,
    noise_kind: str = "uniform",
    reporter: Optional[Reporter] = None,
) -> dict[str, Any]:
    """Retrain without the K most harmful / K random / K highest-loss training examples for
    each K (see the module doc); returns the dict also written to value_evaluation.json."""
    from influence_cli.app import ensure_members

    if seeds < 1:
        raise InflError(f"evaluate --value: seeds must be at least 1, not {seeds}")
    reporter = reporter or Reporter()
    total = Stopwatch()
    session = _value_session(config, noise, noise_kind, reporter)
    data = session.data()
    n = len(data.train)
    counts = sorted({parse_k(k, n) for k in ks})
    if not counts:
        raise InflError("evaluate --value: give at least one K (a count or a fraction)")
    halves = _halves(session)
    members = ensure_members(session)
    from influence_cli.app.choice import resolve_strategy

    strategy = resolve_strategy(session, strategy)  # auto → exact or ekfac, said once
    orders = _rankings(members, session, strategy, halves)
    retrainer = Retrainer(session, halves)
    seed_list = [int(session.config.seed) + s for s in range(seeds)]
    flipped = data.noise.flipped.numpy().astype(bool) if data.noise is not None else None
    with reporter.task("retraining without the dropped examples", (1 + len(counts) * len(METHODS)) * seeds) as advance:
        def summarise(dropped: np.ndarray) -> dict[str, Any]:
            runs = []
            for seed in seed_list:
                runs.append(retrainer.metrics(dropped, seed))
                advance(1)
            entry = {**_summary(runs), "dropped": np.sort(dropped).tolist()}
            if flipped is not None:
                entry["flipped_dropped"] = int(flipped[dropped].sum())
            return entry

        full = summarise(np.zeros(0, dtype=np.int64))
        removals = [
            {"k": k, "fraction": clean_number(k / n), **{m: summarise(orders[m][:k]) for m in METHODS}} for k in counts
        ]
    result = _result(session, strategy, halves, seed_list, full, removals, retrainer, flipped)
    result["seconds"] = clean_number(total(), 3)
    result = json_safe(result)
    if session.dist.is_main:
        session.run.ensure()
        atomic_write_json(session.run.root / "value_evaluation.json", result)
    return result


def _result(session: Any, strategy: str, halves: Halves, seeds: list[int], full: dict[str, Any],
            removals: list[dict[str, Any]], retrainer: Retrainer, flipped: Optional[np.ndarray]) -> dict[str, Any]:
    config, data = session.config, session.data()
    noise = None
    if flipped is not None and config.data.label_noise is not None:
        noise = {**config.data.label_noise.model_dump(mode="json"), "flipped": int(flipped.sum())}
    return {
        "evaluation": "value",
        "config": config.name,
        "run_dir": str(session.run.root),
        "strategy": strategy,
        "measurement": "loss",
        "examples": len(data.train),
        "validation_rows": len(halves.val_x),
        "heldout_rows": len(halves.held_x),
        "query_set": "validation half of the test split (seeded permutation, first ceil(T/2) rows)",
        "seeds": seeds,
        "noise": noise,
        "full": full,
        "removals": removals,
        "retraining": {"trained_now": retrainer.trained_now, "reused": retrainer.reused,
                       "seconds_now": clean_number(retrainer.seconds, 3), "cache_dir": str(retrainer.cache_dir)},
        "version": __version__,
    }
