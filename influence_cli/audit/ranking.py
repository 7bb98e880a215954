"""Self-influence ranking, the flagging rule and suggested labels.

This module is pure: it receives numpy arrays (self-influence scores, labels, predicted
probabilities) and returns pandas frames and plain dicts. It never trains or touches
gradients.

Flagging rule
-------------
Let ``s_i`` be the self-influence of training example ``i`` (N examples). Self-influence
is ``g_iᵀ (H + λI)⁻¹ g_i``: large when the model had to bend itself around the example.
First a set of *candidates* is chosen by ``audit.flag.rule``:

``rule: mad`` (default; ``k`` is ``audit.flag.k``)
    ``x_i = log(max(s_i, tiny))`` (``tiny`` = the smallest positive float64, so zero or
    slightly negative round-off values never produce ``-inf``), ``m = median(x)``,
    ``MAD = median(|x_i - m|)`` and ``z_i = (x_i - m) / (1.4826 · MAD)``.
    Example ``i`` is a candidate when ``z_i > k``. The log scale is used because
    self-influence is positive, heavy-tailed and spans orders of magnitude; ``1.4826 · MAD``
    estimates the standard deviation of normally distributed data, so ``k`` reads as
    "robust standard deviations above the typical example".
    If ``MAD = 0`` (more than half of the examples share one value) the scale falls back
    to ``1.2533 · mean(|x_i - m|)`` (the mean absolute deviation, scaled the same way); if
    that is zero too (all scores equal) there are no candidates.

``rule: top_fraction`` (``fraction`` is ``audit.flag.fraction``)
    The candidates are the first ``ceil(fraction · N)`` rows of the ranking (highest
    self-influence first, ties broken by the lower training index).

``require_disagreement: true`` (default)
    A candidate is flagged only when its given label is not the model's most probable
    class (argmax of the predicted probabilities; ties go to the lower class index).
    With ``top_fraction`` this means at most ``ceil(fraction · N)`` rows are flagged, and
    usually fewer. With ``false`` every candidate is flagged.

For flagged rows ``suggested_label`` is the name of the model's most probable class (for
a flagged row whose label the model agrees with, which can only happen with
``require_disagreement: false``, that is the given label itself); it is the empty string
for rows that are not flagged.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from influence_cli.config import FlagConfig
from influence_cli.errors import DataError, InfluenceError

SELF_INFLUENCE_COLUMNS = [
    "rank",
    "index",
    "id",
    "label",
    "label_name",
    "predicted",
    "predicted_name",
    "label_prob",
    "loss",
    "self_influence",
    "flagged",
    "suggested_label",
    "score",
]

#: Consistency constant: 1.4826 · MAD estimates σ for normally distributed data.
MAD_SCALE = 1.4826
#: Fallback when MAD = 0: sqrt(pi/2) · mean absolute deviation estimates σ for normal data.
MEAN_AD_SCALE = 1.2533
#: Floor applied before taking logs (scores and probabilities).
TINY = float(np.finfo(np.float64).tiny)

TOP_PAIRS = 10


# ----------------------------------------------------------------------------- flagging


def robust_z(self_influence: np.ndarray, log_scale: bool = True) -> np.ndarray:
    """Robust z-score of log self-influence, as used by ``rule: mad`` (training order);
    ``log_scale=False`` for scores that can be negative (margins): the values themselves.

    Returns zeros when every score is the same (no spread to measure against).
    """
    s = np.asarray(self_influence, dtype=np.float64).reshape(-1)
    if s.size == 0:
        return np.zeros(0, dtype=np.float64)
    x = np.log(np.maximum(s, TINY)) if log_scale else s
    m = float(np.median(x))
    deviation = np.abs(x - m)
    scale = MAD_SCALE * float(np.median(deviation))
    if not scale > 0.0:
        scale = MEAN_AD_SCALE * float(np.mean(deviation))
    if not scale > 0.0:
        return np.zeros_like(x)
    return (x - m) / scale


def ranking_order(self_influence: np.ndarray) -> np.ndarray:
    """Training indices sorted by self-influence descending, ties by index ascending."""
    s = np.asarray(self_influence, dtype=np.float64).reshape(-1)
    index = np.arange(s.size)
    # lexsort sorts by the last key first; it is stable, so equal scores keep index order.
    return np.lexsort((index, -s))


def top_count(fraction: float, n: int) -> int:
    """``ceil(fraction · n)`` robust to float round-off (0.07 · 100 is 7, not 8)."""
    if n <= 0:
        return 0
    return min(n, int(math.ceil(round(float(fraction) * n, 9))))


def flag_mask(
    self_influence: np.ndarray,
    labels: np.ndarray,
    predicted: np.ndarray,
    flag: Optional[FlagConfig] = None,
    log_scale: bool = True,
) -> np.ndarray:
    """Boolean mask of flagged examples, in training order (see the module docstring).

    ``predicted`` is the model's argmax class per example. ``self_influence`` may be any
    ``audit.score`` (``log_scale=False`` for those that can be negative).
    """
    flag = flag or FlagConfig()
    s = np.asarray(self_influence, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    predicted = np.asarray(predicted).reshape(-1)
    n = s.size
    if labels.size != n or predicted.size != n:
        raise ValueError(
            f"flag_mask: self_influence has {n} values but labels has {labels.size} and predicted {predicted.size}"
        )
    _check_finite(s)
    if flag.rule == "mad":
        candidate = robust_z(s, log_scale) > flag.k
    elif flag.rule == "top_fraction":
        candidate = np.zeros(n, dtype=bool)
        candidate[ranking_order(s)[: top_count(flag.fraction, n)]] = True
    else:  # pragma: no cover - FlagConfig validates the literal
        raise ValueError(f"unknown flag rule {flag.rule!r}")
    if flag.require_disagreement:
        candidate &= labels != predicted
    return candidate


# ----------------------------------------------------------------------------- ranking


def build_ranking(
    self_influence: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    ids: Sequence[Any],
    class_names: Sequence[str],
    flag: Optional[FlagConfig] = None,
    score: Optional[np.ndarray] = None,
    score_name: str = "self_influence",
) -> pd.DataFrame:
    """One row per training example with :data:`SELF_INFLUENCE_COLUMNS`, sorted by rank.

    ``probs`` is the (N, K) softmax output of the model for the training set, ``labels``
    the given labels, ``ids`` the stable example ids, ``class_names`` the K class names.
    ``score`` (default: the self-influence) is the ``audit.score`` named ``score_name``
    that orders the rows and picks the flag candidates; it is the ``score`` column.
    """
    flag = flag or FlagConfig()
    s = np.asarray(self_influence, dtype=np.float64).reshape(-1)
    n = s.size
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size != n:
        raise ValueError(f"build_ranking: expected {n} labels, got shape {labels.shape}")
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != n:
        raise ValueError(f"build_ranking: expected probs of shape ({n}, K), got {probs.shape}")
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"build_ranking: expected {n} ids, got {len(ids)}")
    class_names = [str(c) for c in class_names]
    k = probs.shape[1]
    if len(class_names) != k:
        raise DataError(
            f"the model predicts {k} classes but the dataset has {len(class_names)} class names; "
            "make the model's output size match the number of classes"
        )
    if n and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise DataError("labels must be integer class indices")
    labels = labels.astype(np.int64)
    if n and (labels.min() < 0 or labels.max() >= k):
        bad = int(np.flatnonzero((labels < 0) | (labels >= k))[0])
        raise DataError(
            f"label {int(labels[bad])} of training example {bad} (id {ids[bad]}) is outside the "
            f"model's {k} classes (0..{k - 1})"
        )
    _check_finite(s)
    ranked = s if score is None else np.asarray(score, dtype=np.float64).reshape(-1)
    if ranked.size != n:
        raise ValueError(f"build_ranking: expected {n} scores, got {ranked.size}")
    _check_finite(ranked)
    if not np.all(np.isfinite(probs)):
        count = int((~np.isfinite(probs)).any(axis=1).sum())
        raise InfluenceError(
            f"the model's predicted probabilities are not finite for {count} training examples; "
            "the checkpoint produces NaN/inf outputs (retrain it or check the model)"
        )

    predicted = probs.argmax(axis=1).astype(np.int64) if k else np.zeros(n, dtype=np.int64)
    label_prob = np.clip(probs[np.arange(n), labels], 0.0, 1.0) if n else np.zeros(0)
    loss = -np.log(np.maximum(label_prob, TINY))
    loss = np.maximum(loss, 0.0)  # -log(1) may round to -0.0
    from influence_cli.audit.scores import LOG_SCALE

    flagged = flag_mask(ranked, labels, predicted, flag, log_scale=score_name in LOG_SCALE)

    names = np.array(class_names, dtype=object)
    label_name = names[labels] if n else np.array([], dtype=object)
    predicted_name = names[predicted] if n else np.array([], dtype=object)
    suggested = np.where(flagged, predicted_name, "") if n else np.array([], dtype=object)

    order = ranking_order(ranked)
    frame = pd.DataFrame(
        {
            "rank": np.arange(1, n + 1, dtype=np.int64),
            "index": order.astype(np.int64),
            "id": pd.Series(np.array(ids, dtype=object)[order] if n else [], dtype=object),
            "label": labels[order],
            "label_name": pd.Series(label_name[order], dtype=object),
            "predicted": predicted[order],
            "predicted_name": pd.Series(predicted_name[order], dtype=object),
            "label_prob": label_prob[order].astype(np.float64),
            "loss": loss[order].astype(np.float64),
            "self_influence": s[order],
            "flagged": flagged[order].astype(bool),
            "suggested_label": pd.Series(suggested[order], dtype=object),
            "score": ranked[order],
        },
        columns=SELF_INFLUENCE_COLUMNS,
    )
    return frame


def _check_finite(s: np.ndarray) -> None:
    bad = ~np.isfinite(s)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InfluenceError(
            f"self-influence is not finite for {int(bad.sum())} training examples (first: index {first}); "
            "the curvature is ill-conditioned: raise influence.damping or use influence.dtype: float64"
        )


# ----------------------------------------------------------------------------- summary


def class_summary(df: pd.DataFrame, class_names: Sequence[str]) -> dict:
    """Per-class counts of flagged examples and the most common given → suggested pairs.

    Returns plain Python ints/floats/strings (JSON-serialisable)::

        {"totals": {"examples", "flagged", "flagged_fraction", "classes"},
         "classes": [{"label", "name", "examples", "flagged", "flagged_fraction"}, ...],
         "pairs": [{"given_label", "given", "suggested_label", "suggested", "count"}, ...]}

    ``classes`` lists every class in label order (also classes with no examples);
    ``pairs`` holds at most 10 (given → suggested) pairs among flagged rows, most common
    first (ties by given then suggested class index).
    """
    class_names = [str(c) for c in class_names]
    labels = df["label"].to_numpy(dtype=np.int64)
    flagged = df["flagged"].to_numpy(dtype=bool)
    predicted = df["predicted"].to_numpy(dtype=np.int64)
    k = len(class_names)
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"class_summary: labels must lie in 0..{k - 1}")
    examples = np.bincount(labels, minlength=k)
    flagged_count = np.bincount(labels[flagged], minlength=k)

    classes = [
        {
            "label": c,
            "name": class_names[c],
            "examples": int(examples[c]),
            "flagged": int(flagged_count[c]),
            "flagged_fraction": float(flagged_count[c] / examples[c]) if examples[c] else 0.0,
        }
        for c in range(k)
    ]

    counter = Counter(zip(labels[flagged].tolist(), predicted[flagged].tolist()))
    ordered = sorted(counter.items(), key=lambda item: (-item[1], item[0][0], item[0][1]))[:TOP_PAIRS]
    pairs = [
        {
            "given_label": int(g),
            "given": class_names[g] if 0 <= g < k else str(g),
            "suggested_label": int(p),
            "suggested": class_names[p] if 0 <= p < k else str(p),
            "count": int(count),
        }
        for (g, p), count in ordered
    ]

    n = int(labels.size)
    total_flagged = int(flagged.sum())
    return {
        "totals": {
            "examples": n,
            "flagged": total_flagged,
            "flagged_fraction": float(total_flagged / n) if n else 0.0,
            "classes": k,
        },
        "classes": classes,
        "pairs": pairs,
    }
