"""Ranking, flagging rule and class summary of the audit layer."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from influence_cli.audit.ranking import (
    SELF_INFLUENCE_COLUMNS,
    build_ranking,
    class_summary,
    flag_mask,
    robust_z,
    top_count,
)
from influence_cli.render.files import write_json
from influence_cli.config import FlagConfig
from influence_cli.errors import DataError, InfluenceError

NAMES3 = ["cat", "dog", "bird"]


def probs_predicting(predicted: np.ndarray, k: int, confidence: float = 0.9) -> np.ndarray:
    """Softmax-like rows whose argmax is ``predicted``."""
    n = len(predicted)
    probs = np.full((n, k), (1.0 - confidence) / (k - 1))
    probs[np.arange(n), predicted] = confidence
    return probs


def reference_mad_mask(s, labels, predicted, k, require_disagreement):
    """The rule written out independently with numpy medians."""
    x = np.log(np.maximum(np.asarray(s, dtype=np.float64), np.finfo(np.float64).tiny))
    med = np.median(x)
    mad = np.median(np.abs(x - med))
    z = (x - med) / (1.4826 * mad)
    mask = z > k
    if require_disagreement:
        mask &= np.asarray(labels) != np.asarray(predicted)
    return mask


# ----------------------------------------------------------------------------- columns/order


def test_columns_exact_and_in_order():
    expected = [
        "rank", "index", "id", "label", "label_name", "predicted", "predicted_name",
        "label_prob", "loss", "self_influence", "flagged", "suggested_label", "score",
    ]
    assert SELF_INFLUENCE_COLUMNS == expected
    s = np.array([0.5, 2.0, 1.0])
    df = build_ranking(s, np.array([0, 1, 2]), probs_predicting(np.array([0, 1, 2]), 3), ["a", "b", "c"], NAMES3)
    assert list(df.columns) == expected


def test_sorted_descending_ties_by_index_and_ranks():
    s = np.array([1.0, 3.0, 3.0, 2.0, 0.0, 3.0])
    labels = np.zeros(6, dtype=int)
    df = build_ranking(s, labels, probs_predicting(labels, 3), [f"id{i}" for i in range(6)], NAMES3)
    assert df["index"].tolist() == [1, 2, 5, 3, 0, 4]
    assert df["rank"].tolist() == [1, 2, 3, 4, 5, 6]
    assert df["id"].tolist() == ["id1", "id2", "id5", "id3", "id0", "id4"]
    assert np.all(np.diff(df["self_influence"].to_numpy()) <= 0)
    assert df["self_influence"].tolist() == [3.0, 3.0, 3.0, 2.0, 1.0, 0.0]


def test_many_ties_are_broken_by_index():
    rng = np.random.default_rng(7)
    s = rng.integers(0, 5, 500).astype(float)
    labels = np.zeros(500, dtype=int)
    df = build_ranking(s, labels, probs_predicting(labels, 3), [str(i) for i in range(500)], NAMES3)
    expected = sorted(range(500), key=lambda i: (-s[i], i))
    assert df["index"].tolist() == expected


def test_label_prob_loss_predicted_from_hand_made_probs():
    probs = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.1, 0.1, 0.8],
            [0.3, 0.6, 0.1],
            [0.0, 1.0, 0.0],  # the given label has probability exactly 0
        ]
    )
    labels = np.array([0, 0, 1, 0])
    s = np.array([4.0, 3.0, 2.0, 1.0])  # ranking order == training order
    df = build_ranking(s, labels, probs, ["a", "b", "c", "d"], NAMES3, FlagConfig(rule="top_fraction", fraction=1.0))
    assert df["index"].tolist() == [0, 1, 2, 3]
    assert df["predicted"].tolist() == [0, 2, 1, 1]
    assert df["predicted_name"].tolist() == ["cat", "bird", "dog", "dog"]
    assert df["label_name"].tolist() == ["cat", "cat", "dog", "cat"]
    np.testing.assert_allclose(df["label_prob"].to_numpy(), [0.7, 0.1, 0.6, 0.0])
    np.testing.assert_allclose(df["loss"].to_numpy()[:3], [-math.log(0.7), -math.log(0.1), -math.log(0.6)])
    assert np.isfinite(df["loss"]).all()
    assert df["loss"].iloc[3] > 100  # clamped, not inf
    assert (df["loss"] >= 0).all()


def test_suggested_label_only_on_flagged_rows():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    predicted = np.array([1, 1, 2, 2, 0, 2, 0, 1])  # rows 0, 3, 4 disagree
    s = np.array([9.0, 8.0, 1.0, 7.0, 6.0, 2.0, 3.0, 4.0])
    flag = FlagConfig(rule="top_fraction", fraction=0.5, require_disagreement=True)
    df = build_ranking(s, labels, probs_predicting(predicted, 3), [str(i) for i in range(8)], NAMES3, flag)
    flagged = df[df["flagged"]]
    assert sorted(flagged["index"].tolist()) == [0, 3, 4]
    assert (flagged["suggested_label"] == flagged["predicted_name"]).all()
    assert flagged.set_index("index")["suggested_label"].to_dict() == {0: "dog", 3: "bird", 4: "cat"}
    assert (df.loc[~df["flagged"], "suggested_label"] == "").all()
    assert df["flagged"].dtype == bool


# ----------------------------------------------------------------------------- the flagging rule


def test_mad_rule_matches_independent_computation():
    x = np.array([0.0, 0.1, -0.1, 0.2, -0.2, 0.3, -0.3, 1.0, 2.0, 5.0])
    s = np.exp(x)
    labels = np.zeros(10, dtype=int)
    predicted = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 0])  # rows 7, 8 disagree
    # By hand: median 0.15, MAD 0.3, z = (x - 0.15) / 0.44478 → z(2.0) = 4.16, z(5.0) = 10.9, z(1.0) = 1.91.
    mask = flag_mask(s, labels, predicted, FlagConfig(rule="mad", k=3.0, require_disagreement=False))
    assert np.flatnonzero(mask).tolist() == [8, 9]
    np.testing.assert_array_equal(mask, reference_mad_mask(s, labels, predicted, 3.0, False))

    mask = flag_mask(s, labels, predicted, FlagConfig(rule="mad", k=3.0, require_disagreement=True))
    assert np.flatnonzero(mask).tolist() == [8]
    np.testing.assert_array_equal(mask, reference_mad_mask(s, labels, predicted, 3.0, True))

    mask = flag_mask(s, labels, predicted, FlagConfig(rule="mad", k=1.9, require_disagreement=False))
    assert np.flatnonzero(mask).tolist() == [7, 8, 9]
    np.testing.assert_allclose(robust_z(s)[9], (5.0 - 0.15) / (1.4826 * 0.3))


def test_mad_rule_random_scores_match_reference():
    rng = np.random.default_rng(3)
    s = np.exp(rng.normal(size=500) * 2.0) * 1e3
    s[rng.choice(500, 12, replace=False)] *= 1e4
    labels = rng.integers(0, 5, 500)
    predicted = np.where(rng.random(500) < 0.5, labels, (labels + 1) % 5)
    for k in (1.0, 2.5, 3.0):
        for disagree in (False, True):
            mask = flag_mask(s, labels, predicted, FlagConfig(rule="mad", k=k, require_disagreement=disagree))
            expected = reference_mad_mask(s, labels, predicted, k, disagree)
            np.testing.assert_array_equal(mask, expected)
    assert 0 < flag_mask(s, labels, predicted, FlagConfig(k=3.0)).sum() < 500


def test_top_fraction_counts_with_and_without_disagreement():
    n = 100
    rng = np.random.default_rng(0)
    s = rng.permutation(n).astype(float) + 1.0  # distinct scores
    labels = np.zeros(n, dtype=int)
    predicted = np.zeros(n, dtype=int)
    top7 = np.argsort(-s)[:7]
    predicted[top7[[0, 2, 5]]] = 1  # three of the top 7 disagree
    predicted[np.argsort(-s)[50]] = 2  # a disagreeing row outside the top 7

    # 0.07 * 100 = 7.000000000000001 in floating point: must still be 7 rows.
    assert top_count(0.07, n) == 7
    mask = flag_mask(s, labels, predicted, FlagConfig(rule="top_fraction", fraction=0.07, require_disagreement=False))
    assert mask.sum() == 7
    assert set(np.flatnonzero(mask)) == set(top7)

    mask = flag_mask(s, labels, predicted, FlagConfig(rule="top_fraction", fraction=0.07, require_disagreement=True))
    assert mask.sum() == 3
    assert set(np.flatnonzero(mask)) == set(top7[[0, 2, 5]])

    # ceil: 0.021 * 100 = 2.1 → 3 rows; ties at the cut are broken by the lower index.
    assert top_count(0.021, n) == 3
    tied = np.ones(10)
    mask = flag_mask(tied, np.zeros(10, int), np.zeros(10, int),
                     FlagConfig(rule="top_fraction", fraction=0.25, require_disagreement=False))
    assert np.flatnonzero(mask).tolist() == [0, 1, 2]


def test_top_fraction_flags_are_the_top_of_the_ranking_frame():
    rng = np.random.default_rng(1)
    n = 40
    s = rng.exponential(size=n)
    labels = rng.integers(0, 3, n)
    flag = FlagConfig(rule="top_fraction", fraction=0.1, require_disagreement=False)
    df = build_ranking(s, labels, rng.dirichlet(np.ones(3), n), [str(i) for i in range(n)], NAMES3, flag)
    assert df["flagged"].tolist() == [True] * 4 + [False] * (n - 4)


def test_mad_zero_does_not_crash_or_flag_everything():
    labels = np.zeros(11, dtype=int)
    predicted = np.ones(11, dtype=int)  # everything disagrees, so only the scores decide
    s = np.array([1.0] * 10 + [100.0])  # MAD of log s is 0
    mask = flag_mask(s, labels, predicted, FlagConfig(rule="mad", k=3.0))
    assert np.flatnonzero(mask).tolist() == [10]

    # MAD = 0 with a spread tail: the fallback scale is 1.2533 * mean|x - median|.
    x = np.array([0.0] * 6 + [0.5, 1.0, 2.0, 10.0])
    scale = 1.2533 * np.mean(np.abs(x - np.median(x)))  # 1.2533 * 1.35
    np.testing.assert_allclose(robust_z(np.exp(x)), (x - 0.0) / scale)
    mask = flag_mask(np.exp(x), np.zeros(10, int), np.ones(10, int), FlagConfig(rule="mad", k=3.0))
    assert np.flatnonzero(mask).tolist() == [9]

    mask = flag_mask(np.full(11, 5.0), labels, predicted, FlagConfig(rule="mad"))
    assert not mask.any()
    assert np.all(robust_z(np.full(11, 5.0)) == 0)

    zeros = np.array([0.0] * 6 + [1.0, 2.0, 3.0, -1e-12])  # zeros and round-off negatives
    mask = flag_mask(zeros, np.zeros(10, int), np.ones(10, int), FlagConfig(rule="mad"))
    assert mask.sum() < 10
    assert np.all(np.isfinite(robust_z(zeros)))


def test_default_flag_config_is_mad_with_disagreement():
    # Whatever the configured default k is, omitting the config means FlagConfig(): mad + disagreement.
    default = FlagConfig()
    assert default.rule == "mad" and default.require_disagreement is True
    rng = np.random.default_rng(5)
    s = np.exp(rng.normal(size=300) * 1.5)
    labels = rng.integers(0, 3, 300)
    predicted = np.where(rng.random(300) < 0.6, labels, (labels + 1) % 3)
    mask = flag_mask(s, labels, predicted)
    np.testing.assert_array_equal(mask, reference_mad_mask(s, labels, predicted, default.k, True))
    assert 0 < mask.sum() < (labels != predicted).sum()


# ----------------------------------------------------------------------------- input checks


def test_non_finite_self_influence_is_a_clear_error():
    labels = np.zeros(3, dtype=int)
    with pytest.raises(InfluenceError, match="damping"):
        build_ranking(np.array([1.0, np.nan, 2.0]), labels, probs_predicting(labels, 3), list("abc"), NAMES3)


def test_class_count_mismatch_and_bad_labels():
    labels = np.array([0, 1, 3])
    with pytest.raises(DataError, match="outside"):
        build_ranking(np.ones(3), labels, np.full((3, 3), 1 / 3), list("abc"), NAMES3)
    with pytest.raises(DataError, match="4 class names"):
        build_ranking(np.ones(3), np.zeros(3, int), np.full((3, 3), 1 / 3), list("abc"), NAMES3 + ["fish"])
    with pytest.raises(ValueError):
        build_ranking(np.ones(3), np.zeros(3, int), np.full((3, 3), 1 / 3), list("ab"), NAMES3)


def test_empty_training_set_gives_empty_frame():
    df = build_ranking(np.zeros(0), np.zeros(0, int), np.zeros((0, 3)), [], NAMES3)
    assert list(df.columns) == SELF_INFLUENCE_COLUMNS
    assert len(df) == 0
    summary = class_summary(df, NAMES3)
    assert summary["totals"] == {"examples": 0, "flagged": 0, "flagged_fraction": 0.0, "classes": 3}


# ----------------------------------------------------------------------------- class summary


def tiny_frame() -> pd.DataFrame:
    # given:    cat cat cat dog dog bird bird bird
    # flagged:   y   y   n   y   n    y    y    n
    # predicted dog dog cat cat dog  cat  dog  bird
    rows = [
        (0, 1, True), (0, 1, True), (0, 0, False), (1, 0, True),
        (1, 1, False), (2, 0, True), (2, 1, True), (2, 2, False),
    ]
    return pd.DataFrame(
        {
            "label": [r[0] for r in rows],
            "label_name": [NAMES3[r[0]] for r in rows],
            "predicted": [r[1] for r in rows],
            "predicted_name": [NAMES3[r[1]] for r in rows],
            "flagged": [r[2] for r in rows],
            "suggested_label": [NAMES3[r[1]] if r[2] else "" for r in rows],
        }
    )


def test_class_summary_counts():
    summary = class_summary(tiny_frame(), NAMES3 + ["fish"])
    assert summary["totals"] == {"examples": 8, "flagged": 5, "flagged_fraction": 5 / 8, "classes": 4}
    by_name = {c["name"]: c for c in summary["classes"]}
    assert [c["name"] for c in summary["classes"]] == ["cat", "dog", "bird", "fish"]
    assert (by_name["cat"]["examples"], by_name["cat"]["flagged"]) == (3, 2)
    assert by_name["cat"]["flagged_fraction"] == pytest.approx(2 / 3)
    assert (by_name["dog"]["examples"], by_name["dog"]["flagged"]) == (2, 1)
    assert (by_name["bird"]["examples"], by_name["bird"]["flagged"]) == (3, 2)
    assert by_name["fish"] == {"label": 3, "name": "fish", "examples": 0, "flagged": 0, "flagged_fraction": 0.0}
    pairs = [(p["given"], p["suggested"], p["count"]) for p in summary["pairs"]]
    assert pairs == [("cat", "dog", 2), ("dog", "cat", 1), ("bird", "cat", 1), ("bird", "dog", 1)]


def test_class_summary_keeps_top_ten_pairs():
    k = 12
    labels = np.repeat(np.arange(k), np.arange(1, k + 1))  # class c has c+1 examples
    df = pd.DataFrame({"label": labels, "predicted": (labels + 1) % k, "flagged": True})
    pairs = class_summary(df, [f"c{i}" for i in range(k)])["pairs"]
    assert len(pairs) == 10
    assert [p["count"] for p in pairs] == list(range(12, 2, -1))
    assert (pairs[0]["given"], pairs[0]["suggested"]) == ("c11", "c0")


def test_class_summary_json_round_trip(tmp_path):
    df = build_ranking(
        np.array([5.0, 1.0, 4.0, 1.2, 0.9, 1.1, 1.0, 0.95, 1.05, 1.0]),
        np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]),
        probs_predicting(np.array([1, 1, 0, 0, 1, 2, 0, 1, 2, 0]), 3),
        [f"x{i}" for i in range(10)],
        NAMES3,
        FlagConfig(rule="top_fraction", fraction=0.2),
    )
    summary = class_summary(df, NAMES3)
    assert summary["totals"]["flagged"] == 2
    # Plain Python types only: the standard json module must accept it without help.
    text = json.dumps(summary)
    assert json.loads(text) == summary
    path = write_json(summary, tmp_path / "summary.json")
    assert json.loads(path.read_text(encoding="utf-8")) == summary
    assert "\n  " in path.read_text(encoding="utf-8")  # indented


def test_another_score_orders_and_flags_on_its_own_scale():
    # the self-influence says nothing here; the score (a margin: negative values allowed) decides
    n = 40
    s = np.full(n, 1.0)
    score = np.linspace(-5.0, -1.0, n)
    score[7] = 6.0
    labels = np.zeros(n, dtype=int)
    probs = probs_predicting(np.where(np.arange(n) == 7, 1, 0), 3)
    df = build_ranking(s, labels, probs, [str(i) for i in range(n)], NAMES3, score=score, score_name="loo_margin")
    assert df["index"].iloc[0] == 7 and list(df["score"]) == sorted(score, reverse=True)
    assert list(df.loc[df["flagged"], "index"]) == [7]
    assert (df["self_influence"] == 1.0).all()
    z = robust_z(score, log_scale=False)
    np.testing.assert_allclose(z, (score - np.median(score)) / (1.4826 * np.median(np.abs(score - np.median(score)))))
