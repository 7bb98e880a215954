"""LDS: sign handling on a case with a known answer, and resumable retraining."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.console import Console

from influence_cli.config import config_from_dict
from influence_cli.errors import InflError
from influence_cli.evaluation import lds as lds_module
from influence_cli.evaluation import retraining as retraining_module
from influence_cli.evaluation.lds import evaluate_lds, lds_per_row, subset_indices
from influence_cli.render.evaluation import render_lds_table


def logistic_config(tmp_path, name="tiny-lds", epochs=200):
    """Multinomial logistic regression (mlp without hidden layers), trained close to its
    optimum with weight decay: the regime where influence functions are accurate."""
    return config_from_dict(
        {
            "name": name,
            "seed": 0,
            "data": {
                "source": "synthetic",
                "synthetic": {"num_train": 80, "num_test": 40, "shape": [5], "num_classes": 3, "separation": 1.5},
            },
            "model": {"arch": "mlp", "hidden_sizes": []},
            "train": {"epochs": epochs, "batch_size": 128, "lr": 0.05, "weight_decay": 0.01, "device": "cpu"},
            "influence": {"device": "cpu"},
            "output": {"dir": str(tmp_path / "runs")},
        }
    )


def test_per_row_sign_on_an_exactly_linear_measurement():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 30))
    membership = rng.random((12, 30)) < 0.5
    sums = scores @ membership.T  # (T, R)
    # Positive scores lower the loss and raise the margin.
    np.testing.assert_allclose(lds_per_row(5.0 - 0.1 * sums, scores, membership, "loss"), 1.0)
    np.testing.assert_allclose(lds_per_row(-2.0 + 0.1 * sums, scores, membership, "margin"), 1.0)
    np.testing.assert_allclose(lds_per_row(5.0 + 0.1 * sums, scores, membership, "loss"), -1.0)
    constant = np.ones((3, 12))
    assert np.isnan(lds_per_row(constant, scores, membership, "loss")).all()


def test_lds_is_positive_for_a_logistic_model_and_the_sign_matters(tmp_path, monkeypatch):
    config = logistic_config(tmp_path)
    kwargs = dict(subsets=16, fraction=0.5, test_rows=20, strategies=["ekfac", "identity"])
    result = evaluate_lds(config, measurement="loss", **kwargs)
    assert result["retraining"]["trained_now"] == 16
    for name in ("ekfac", "identity"):
        entry = result["strategies"][name]
        assert entry["rows"] == 20
        assert entry["mean"] > 0.5, entry
        assert 0.0 < entry["stderr"] < 0.2
    saved = json.loads((config.run_dir() / "lds.json").read_text())
    assert saved == result

    # The margin's scores are for −margin, so predicted margin = +Σ scores. Cross-entropy
    # is softplus(−margin) — a monotone function of the margin with a per-row positive
    # gradient factor — so both measurements must rank the subsets identically.
    margin = evaluate_lds(config, measurement="margin", **kwargs)
    assert margin["retraining"]["trained_now"] == 16  # the measurement is part of the key
    for name in ("ekfac", "identity"):
        assert margin["strategies"][name]["mean"] == pytest.approx(result["strategies"][name]["mean"], abs=1e-6)

    # The opposite sign convention would make the correlation negative (no retraining).
    original = lds_module.prediction_sign
    monkeypatch.setattr(lds_module, "prediction_sign", lambda m: -original(m))
    flipped = evaluate_lds(config, measurement="loss", **kwargs)
    assert flipped["retraining"]["trained_now"] == 0
    for name in ("ekfac", "identity"):
        assert flipped["strategies"][name]["mean"] == pytest.approx(-result["strategies"][name]["mean"], abs=1e-6)
        assert flipped["strategies"][name]["mean"] < -0.5

    console = Console(file=io.StringIO(), width=160)
    render_lds_table(result, console)
    text = " ".join(console.file.getvalue().split())  # the title wraps to the table's width, which the timings set
    assert "ekfac" in text and "16 subsets of 40/80" in text


def test_retraining_resumes_and_reuses_finished_subsets(tmp_path, monkeypatch):
    config = logistic_config(tmp_path, name="resume", epochs=20)
    calls = []
    real_train = retraining_module.train_model

    def counting(model, train_set, cfg, **kwargs):
        calls.append(len(train_set))
        if interrupt["after"] is not None and len(calls) > interrupt["after"]:
            raise KeyboardInterrupt
        return real_train(model, train_set, cfg, **kwargs)

    interrupt = {"after": 2}
    monkeypatch.setattr(retraining_module, "train_model", counting)
    kwargs = dict(fraction=0.5, test_rows=10, strategies=["identity"])
    with pytest.raises(KeyboardInterrupt):
        evaluate_lds(config, subsets=4, **kwargs)
    cache = config.run_dir() / "lds"
    assert len(list(cache.glob("*.json"))) == 2  # the two finished retrainings
    assert not list(cache.glob(".*.tmp"))

    interrupt["after"] = None
    calls.clear()
    four = evaluate_lds(config, subsets=4, **kwargs)
    assert len(calls) == 2 and set(calls) == {40}
    assert four["retraining"] == {**four["retraining"], "trained_now": 2, "reused": 2, "models": 4}

    calls.clear()
    six = evaluate_lds(config, subsets=6, **kwargs)
    assert len(calls) == 2
    assert six["retraining"]["reused"] == 4
    assert len(list(cache.glob("*.json"))) == 6

    # Two seeds per subset: new files for the second seed only.
    calls.clear()
    evaluate_lds(config, subsets=6, seeds=2, **kwargs)
    assert len(calls) == 6
    assert len(list(cache.glob("*.json"))) == 12

    # Subset r does not depend on how many subsets are drawn; sizes are round(fraction·N).
    a, b = subset_indices(0, 3, 80, 40), subset_indices(0, 3, 80, 40)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 40 and not np.array_equal(a, subset_indices(0, 4, 80, 40))


def test_bad_arguments(tmp_path):
    config = logistic_config(tmp_path)
    with pytest.raises(InflError, match="measurement"):
        evaluate_lds(config, measurement="accuracy")
    with pytest.raises(InflError, match="at least 2 subsets"):
        evaluate_lds(config, subsets=1)
    with pytest.raises(InflError, match="fraction"):
        evaluate_lds(config, fraction=1.0)
