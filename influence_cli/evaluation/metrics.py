"""Ranking metrics for the self-evaluation (pure numpy, no torch, no scikit-learn).

Conventions shared by every function here:

- ``scores``: one finite number per example; a HIGHER score means MORE suspicious (ranked
  first). ``positives``: a boolean mask (or 0/1 array) of the examples that should be
  found (e.g. the labels flipped on purpose).
- Ties are handled deterministically and independently of the input order:
  AUROC counts a tied (positive, negative) pair as 1/2 (Mann-Whitney U with average
  ranks); average precision follows scikit-learn (one threshold per distinct score);
  precision@k and recall@fraction give the *expected* value when a tie straddles the
  cut-off (the tied group contributes pro rata), which equals the mean over every
  tie-breaking order.
- Inputs that make a metric undefined raise ``ValueError`` with the reason (e.g. AUROC
  with no negatives, "all examples are positive").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "auroc",
    "average_precision",
    "precision_at_k",
    "recall_at_fraction",
    "spearman",
    "average_ranks",
    "top_count",
]


def _check(scores: Any, positives: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    p_raw = np.asarray(positives).reshape(-1)
    if p_raw.dtype != bool:
        if not np.all((p_raw == 0) | (p_raw == 1)):
            raise ValueError("positives must be a boolean mask or an array of 0/1")
    p = p_raw.astype(bool)
    if s.shape != p.shape:
        raise ValueError(f"scores ({s.size}) and positives ({p.size}) differ in length")
    if s.size == 0:
        raise ValueError("no examples to rank")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    return s, p


def _need_positive(p: np.ndarray) -> None:
    if not p.any():
        raise ValueError("no positive examples: the metric is undefined")


def _need_negative(p: np.ndarray) -> None:
    if p.all():
        raise ValueError("all examples are positive: the metric is undefined without negatives")


def average_ranks(x: Any) -> np.ndarray:
    """1-based ranks in ascending order; tied values get the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    n = x.size
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    new_group = np.empty(n, dtype=bool)
    if n:
        new_group[0] = True
        new_group[1:] = sx[1:] != sx[:-1]
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)  # exclusive
    group_rank = (starts + ends - 1) / 2.0 + 1.0
    group = np.cumsum(new_group) - 1
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = group_rank[group]
    return ranks


def auroc(scores: Any, positives: Any) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative),
    ties counted 1/2. Needs at least one positive and one negative."""
    s, p = _check(scores, positives)
    _need_positive(p)
    _need_negative(p)
    ranks = average_ranks(s)
    n_pos = int(p.sum())
    n_neg = p.size - n_pos
    u = ranks[p].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(scores: Any, positives: Any) -> float:
    """scikit-learn's average precision: Σ_n (R_n − R_{n−1}) P_n over the distinct score
    thresholds, highest first (a tied group enters the ranking all at once).
    Needs at least one positive; with no negatives it is 1."""
    s, p = _check(scores, positives)
    _need_positive(p)
    order = np.argsort(-s, kind="mergesort")
    ss, pp = s[order], p[order]
    # Last index of each group of equal scores (thresholds).
    last = np.flatnonzero(np.append(ss[1:] != ss[:-1], True))
    tps = np.cumsum(pp)[last].astype(np.float64)
    fps = (last + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    previous = np.concatenate([[0.0], recall[:-1]])
    return float(np.sum((recall - previous) * precision))


def top_count(scores: Any, positives: Any, k: int) -> float:
    """Expected number of positives among the k highest scores (ties shared pro rata)."""
    s, p = _check(scores, positives)
    k = int(k)
    if k < 1 or k > s.size:
        raise ValueError(f"k must lie in 1..{s.size}, not {k}")
    threshold = np.sort(s)[::-1][k - 1]
    above = s > threshold
    at = s == threshold
    slots = k - int(above.sum())  # how many of the tied group make the cut
    return float(p[above].sum() + slots * p[at].sum() / at.sum())


def precision_at_k(scores: Any, positives: Any, k: int) -> float:
    """Share of positives among the k highest scores (expected value under ties)."""
    return top_count(scores, positives, k) / int(k)


def recall_at_fraction(scores: Any, positives: Any, fraction: float) -> float:
    """Share of all positives found in the top ceil(fraction·N) of the ranking."""
    s, p = _check(scores, positives)
    _need_positive(p)
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], not {fraction}")
    # round() first so that e.g. 0.07 * 100 = 7.000000000000001 gives 7, not 8.
    k = max(1, math.ceil(round(float(fraction) * s.size, 9)))
    return top_count(s, p, k) / float(p.sum())


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks).

    NaN when either input is constant (the correlation is undefined), like scipy."""
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"inputs differ in length ({x.size} and {y.size})")
    if x.size < 2:
        raise ValueError("need at least two values for a rank correlation")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("inputs contain NaN or infinite values")
    rx = average_ranks(x)
    ry = average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if denominator == 0.0:
        return float("nan")
    return float(np.clip((rx @ ry) / denominator, -1.0, 1.0))
