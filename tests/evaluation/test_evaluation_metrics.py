"""The ranking metrics against scikit-learn and scipy on fixed random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score

from influence_cli.evaluation.metrics import (
    auroc,
    average_precision,
    average_ranks,
    precision_at_k,
    recall_at_fraction,
    spearman,
)


def _cases():
    rng = np.random.default_rng(1234)
    cases = []
    for n, rate in ((7, 0.3), (50, 0.1), (200, 0.5), (333, 0.05)):
        positives = rng.random(n) < rate
        positives[0], positives[1] = True, False  # both classes present
        continuous = rng.normal(size=n) + 1.5 * positives
        cases.append((continuous, positives))
        # Heavy ties: scores on a coarse grid, some groups mixing positives and negatives.
        cases.append((np.round(continuous * 2) / 2, positives))
        cases.append((rng.integers(0, 3, size=n).astype(float), positives))
    # All scores equal: AUROC 1/2, AP = prevalence.
    cases.append((np.ones(10), np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 0], dtype=bool)))
    return cases


@pytest.mark.parametrize("case", range(len(_cases())))
def test_auroc_and_ap_match_sklearn(case):
    scores, positives = _cases()[case]
    assert auroc(scores, positives) == pytest.approx(roc_auc_score(positives, scores), abs=1e-12)
    assert average_precision(scores, positives) == pytest.approx(
        average_precision_score(positives, scores), abs=1e-12
    )
    # 0/1 integers are accepted like booleans.
    assert auroc(scores, positives.astype(int)) == auroc(scores, positives)


def test_metrics_do_not_depend_on_input_order():
    scores, positives = _cases()[1]  # tied grid
    perm = np.random.default_rng(5).permutation(len(scores))
    for fn in (auroc, average_precision):
        assert fn(scores[perm], positives[perm]) == pytest.approx(fn(scores, positives), abs=1e-12)
    k = int(positives.sum())
    assert precision_at_k(scores[perm], positives[perm], k) == pytest.approx(precision_at_k(scores, positives, k))


def _brute_force_top(scores, positives, k, trials=4000, seed=0):
    """Mean positives in the top k over random tie-breaking orders."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(trials):
        jitter = rng.random(len(scores))
        order = np.lexsort((jitter, -scores))
        total += positives[order[:k]].sum()
    return total / trials


def test_precision_and_recall_without_ties():
    rng = np.random.default_rng(7)
    scores = rng.normal(size=40)
    positives = np.zeros(40, dtype=bool)
    order = np.argsort(-scores)
    positives[order[[0, 2, 5, 30]]] = True
    assert precision_at_k(scores, positives, 1) == 1.0
    assert precision_at_k(scores, positives, 3) == pytest.approx(2 / 3)
    assert precision_at_k(scores, positives, 6) == pytest.approx(3 / 6)
    # top ceil(0.1 * 40) = 4 rows hold 2 of 4 positives; top 15 % = 6 rows hold 3.
    assert recall_at_fraction(scores, positives, 0.1) == pytest.approx(0.5)
    assert recall_at_fraction(scores, positives, 0.15) == pytest.approx(0.75)
    assert recall_at_fraction(scores, positives, 1.0) == 1.0
    # ceil, and no float artefact: 0.07 * 100 = 7.000000000000001 must mean 7 rows.
    s100 = -np.arange(100.0)
    p100 = np.zeros(100, dtype=bool)
    p100[[6, 7]] = True
    assert recall_at_fraction(s100, p100, 0.07) == pytest.approx(0.5)
    assert recall_at_fraction(s100, p100, 0.071) == pytest.approx(1.0)


def test_precision_at_k_with_ties_is_the_mean_over_tie_breaks():
    scores = np.array([5, 4, 4, 4, 4, 3, 3, 1, 0, 0], dtype=float)
    positives = np.array([1, 1, 0, 0, 1, 1, 0, 1, 0, 1], dtype=bool)
    for k in (1, 2, 3, 5, 6, 9):
        expected = _brute_force_top(scores, positives, k) / k
        assert precision_at_k(scores, positives, k) == pytest.approx(expected, abs=0.02)
    # Exact values: k=3 takes 2 of the 4 tied at 4 (2 of them positive): 1 + 2 * 2/4 = 2.
    assert precision_at_k(scores, positives, 3) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=60)
    b = a + rng.normal(size=60)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    # Ties on both sides (average ranks).
    at, bt = np.round(a), np.round(b * 2) / 2
    assert spearman(at, bt) == pytest.approx(spearmanr(at, bt).statistic, abs=1e-12)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_average_ranks_match_scipy():
    from scipy.stats import rankdata

    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    np.testing.assert_allclose(average_ranks(x), rankdata(x))


def test_edge_cases_raise_clear_errors():
    scores = np.array([0.3, 0.1, 0.2])
    with pytest.raises(ValueError, match="all examples are positive"):
        auroc(scores, [True, True, True])
    with pytest.raises(ValueError, match="no positive"):
        auroc(scores, [False, False, False])
    with pytest.raises(ValueError, match="no positive"):
        average_precision(scores, [0, 0, 0])
    with pytest.raises(ValueError, match="no positive"):
        recall_at_fraction(scores, [0, 0, 0], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, math.nan, 0.2], [1, 0, 0])
    with pytest.raises(ValueError, match="length"):
        auroc([0.1, 0.2], [1, 0, 0])
    with pytest.raises(ValueError, match="k must"):
        precision_at_k(scores, [1, 0, 0], 4)
    with pytest.raises(ValueError, match="0/1"):
        auroc(scores, [2, 0, 0])
    # All positive is fine for AP (sklearn gives 1), and a constant input has no Spearman.
    assert average_precision(scores, [1, 1, 1]) == pytest.approx(1.0)
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
