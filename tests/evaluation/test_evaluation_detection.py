"""Label-noise detection on a tiny synthetic config."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from sklearn.metrics import average_precision_score, roc_auc_score

from influence_cli.config import config_from_dict
from influence_cli.errors import InfluenceError
from influence_cli.evaluation import common
from influence_cli.evaluation.detection import METRIC_KEYS, evaluate_noise_detection, noisy_config
from influence_cli.engine import STRATEGIES, BlockStrategy, Strategy
from influence_cli.app import Session, ensure_model
from influence_cli.progress import Reporter
from influence_cli.render.evaluation import render_detection_table

CORE = ("ekfac", "kfac", "diagonal", "identity")


def tiny_config(tmp_path, **train):
    return config_from_dict(
        {
            "name": "tiny-det",
            "seed": 0,
            "data": {
                "source": "synthetic",
                "synthetic": {"num_train": 200, "num_test": 40, "shape": [10], "num_classes": 4, "separation": 4.0},
            },
            "model": {"arch": "mlp", "hidden_sizes": [16]},
            "train": {"epochs": 25, "batch_size": 32, "lr": 0.01, "device": "cpu", **train},
            "influence": {"device": "cpu"},
            "output": {"dir": str(tmp_path / "runs")},
        }
    )


@pytest.fixture(scope="module")
def detection(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    config = tiny_config(tmp)
    return config, evaluate_noise_detection(config, fraction=0.1)


def test_result_has_every_ranking_with_metrics_in_unit_interval(detection):
    config, result = detection
    rankings = result["rankings"]
    strategies = set(common.default_strategies())
    scored = {f"{name}:{score}" for name in strategies for score in ("loo_loss", "relabel_gain", "loo_margin", "loo_margin_sm")}
    expected = strategies | scored | {"loss", "margin", "gradient_norm"}
    assert set(rankings) == expected
    # the default flag ranking: auto resolved on this small model, audit.score loo_margin_sm
    default = result["default"]
    assert default["strategy"] == "exact" and default["score"] == "loo_margin_sm"
    assert default["ranking"] == "exact:loo_margin_sm" and "exact:loo_margin_sm" in result["rankings"]
    assert default["average_precision"] == rankings["exact:loo_margin_sm"]["average_precision"]
    for name in (*CORE, "loss", "gradient_norm"):
        assert "skipped" not in rankings[name], rankings[name]
    for name, entry in rankings.items():
        if "skipped" in entry:
            continue
        for key in METRIC_KEYS:
            assert 0.0 <= entry[key] <= 1.0, (name, key, entry[key])
        assert entry["seconds"] >= 0.0
    # Self-influence finds most of the flips on this easy problem (chance AUROC = 0.5).
    assert rankings["ekfac"]["auroc"] > 0.8
    assert rankings["gradient_norm"]["same_as"] == "identity"
    assert rankings["gradient_norm"]["auroc"] == rankings["identity"]["auroc"]


def test_counts_run_directory_and_saved_json(detection):
    config, result = detection
    assert result["examples"] == 200
    assert result["flipped"] == result["k"] == 20  # round(0.1 * 200)
    assert result["run"] == "tiny-det-noise0.1-uniform"
    run_dir = config.run_dir().parent / result["run"]
    assert result["run_dir"] == str(run_dir)
    assert not (config.run_dir()).exists()  # the clean run is untouched
    saved = json.loads((run_dir / "evaluation.json").read_text())
    assert saved == result
    assert result["chance"]["average_precision"] == pytest.approx(0.1)
    table = pd.read_csv(result["scores_csv"])
    assert len(table) == 200 and int(table["flipped"].sum()) == 20
    assert (table.loc[table["flipped"], "label"] != table.loc[table["flipped"], "original_label"]).all()
    assert (table.loc[~table["flipped"], "label"] == table.loc[~table["flipped"], "original_label"]).all()
    # The flip mask is the data layer's own.
    data = Session(noisy_config(config, 0.1), Reporter()).data()
    np.testing.assert_array_equal(table["flipped"].to_numpy(), data.noise.flipped.numpy())


def test_loss_ranking_matches_sklearn_on_the_saved_losses(detection):
    config, result = detection
    table = pd.read_csv(result["scores_csv"])
    flipped = table["flipped"].to_numpy()
    for name in ("loss", "ekfac", "identity"):
        entry = result["rankings"][name]
        assert entry["auroc"] == pytest.approx(roc_auc_score(flipped, table[name]), abs=2e-6)
        assert entry["average_precision"] == pytest.approx(average_precision_score(flipped, table[name]), abs=2e-6)
    # The saved losses are the noisy model's cross-entropy on the given labels.
    session = Session(noisy_config(config, 0.1), Reporter())
    state = ensure_model(session)
    assert not state.trained_now  # cached by the pipeline
    data = session.data()
    with torch.no_grad():
        losses = F.cross_entropy(state.model(data.train.inputs).double(), data.train.labels, reduction="none")
    np.testing.assert_allclose(table["loss"].to_numpy(), losses.numpy(), rtol=1e-5, atol=1e-7)
    # gradient_norm = ‖∇θ ℓ_i‖² over every tracked parameter (all of this mlp).
    for i in (0, 7, 123):
        state.model.zero_grad()
        F.cross_entropy(state.model(data.train.inputs[i : i + 1]), data.train.labels[i : i + 1]).backward()
        squared = sum(float(p.grad.double().square().sum()) for p in state.model.parameters())
        assert table["gradient_norm"][i] == pytest.approx(squared, rel=1e-3)


def test_failing_strategy_is_skipped_and_others_go_on(tmp_path, monkeypatch):
    class Boom(BlockStrategy, register=False):
        name = "boom"
        description = "always fails"

        def fit_layers(self, ctx):
            raise InfluenceError("model too large for this strategy (test)")

    monkeypatch.setitem(STRATEGIES, "boom", Boom)
    config = tiny_config(tmp_path, epochs=5)
    result = evaluate_noise_detection(config, fraction=0.1, strategies=["boom", "identity"])
    assert result["rankings"]["boom"] == {"type": "strategy", "skipped": "model too large for this strategy (test)"}
    assert 0.0 <= result["rankings"]["identity"]["auroc"] <= 1.0
    # the default flag ranking (auto → exact, loo_margin_sm) is scored too, though not asked for
    default = {"exact", "exact:loo_loss", "exact:relabel_gain", "exact:loo_margin", "exact:loo_margin_sm"}
    scores = {"identity:loo_loss", "identity:relabel_gain", "identity:loo_margin", "identity:loo_margin_sm"}
    assert set(result["rankings"]) == {"boom", "identity", "loss", "margin", "gradient_norm"} | scores | default
    assert result["default"]["ranking"] == "exact:loo_margin_sm"
    again = evaluate_noise_detection(config, fraction=0.1, strategies=["diagonal"])
    assert not again["model"]["trained_now"]
    # identity was not asked for: gradient_norm computes it on its own, same values.
    assert again["rankings"]["gradient_norm"]["auroc"] == result["rankings"]["identity"]["auroc"]
    console = Console(file=io.StringIO(), width=140)
    render_detection_table(result, console)
    text = console.file.getvalue()
    assert "boom skipped: model too large" in text and "gradient_norm" in text and "AUROC" in text


def test_default_strategies_leave_out_slow_ones(monkeypatch):
    def declared(name, description, slow):
        return type(name, (Strategy,), {"name": name, "description": description, "slow": slow}, register=False)

    monkeypatch.setitem(STRATEGIES, "lissa", declared("lissa", "LiSSA iterative solver", True))
    monkeypatch.setitem(STRATEGIES, "crawl", declared("crawl", "very slow reference", True))
    monkeypatch.setitem(STRATEGIES, "exact", declared("exact", "dense Fisher for small models", False))
    names = common.default_strategies()
    assert "lissa" not in names and "crawl" not in names
    assert "exact" in names and set(CORE) <= set(names)


def test_bad_arguments_are_clear_errors(tmp_path):
    from influence_cli.errors import InflError

    config = tiny_config(tmp_path)
    with pytest.raises(InflError, match="not a fraction"):
        evaluate_noise_detection(config, fraction=0.0)
    with pytest.raises(InflError, match="unknown noise kind"):
        evaluate_noise_detection(config, kind="sideways")
    with pytest.raises(InflError, match="no label was flipped"):
        evaluate_noise_detection(config, fraction=0.001)
