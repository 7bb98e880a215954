"""Checkpoint ensembles (influence.ensemble): K models, scores averaged.

The references are built independently of the ensemble plumbing: each member's model is
trained (or loaded) and scored on its own with the library API, then averaged here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.config import config_from_dict, load_config
from influence_cli.errors import ConfigError, InflError
from influence_cli.engine import fit_factors, pairwise_scores, self_influence
from influence_cli.loaders import BatchLoader
from influence_cli.models import build_model, save_checkpoint
from influence_cli.app import Session, ensemble_sessions, run_score, run_self_influence
from influence_cli.progress import Reporter
from influence_cli.training import predict_probs, train_model


def synthetic_config(tmp_path: Path, **influence) -> dict:
    return {
        "name": "ens",
        "seed": 3,
        "data": {"source": "synthetic", "synthetic": {"num_train": 90, "num_test": 20, "shape": [5], "num_classes": 3}},
        "model": {"arch": "mlp", "hidden_sizes": [6]},
        "train": {"epochs": 3, "batch_size": 16, "lr": 0.01},
        "influence": {"batch_size": 32, "strategy": "ekfac", **influence},  # compared with ekfac references
        "output": {"dir": str(tmp_path / "runs")},
    }


def member_reference(config, data, seed: int, checkpoint: Path | None = None):
    """One member scored alone: (self-influence, train probs, model)."""
    model = build_model(config.model, tuple(data.input_shape), len(data.class_names), seed=seed)
    if checkpoint is None:
        train_model(model, data.train, config.train, seed=seed, device=torch.device("cpu"), reporter=Reporter())
    else:
        from influence_cli.models import load_checkpoint

        load_checkpoint(model, checkpoint)
    model.eval()
    loader = BatchLoader(data.train, config.influence.batch_size)
    factors = fit_factors(model, loader, "ekfac", seed=seed)
    scores = self_influence(model, factors, loader).double().numpy()
    return scores, predict_probs(model, data.train).double().numpy(), model, factors


def test_trained_ensemble_averages_members(tmp_path):
    config = config_from_dict(synthetic_config(tmp_path, ensemble=2))
    session = Session(config, Reporter())
    result = run_self_influence(session)
    data = session.data()
    ref0, probs0, _, _ = member_reference(config, data, seed=3)
    ref1, probs1, _, _ = member_reference(config, data, seed=4)
    table = result.table.sort_values("index")
    np.testing.assert_allclose(table["self_influence"].to_numpy(), (ref0 + ref1) / 2, rtol=1e-4)
    assert not np.allclose(ref0, ref1, rtol=1e-2)  # the members really differ
    mean_probs = (probs0 + probs1) / 2
    np.testing.assert_array_equal(table["predicted"].to_numpy(), mean_probs.argmax(1))
    np.testing.assert_allclose(
        table["label_prob"].to_numpy(), mean_probs[np.arange(len(table)), table["label"].to_numpy()], rtol=1e-5
    )
    member_dir = config.run_dir() / "ensemble" / "member-1"
    assert (member_dir / "checkpoint.safetensors").is_file()
    assert (member_dir / "factors" / "ekfac" / "meta.json").is_file()
    assert result.summary["run"]["ensemble"]["members"] == 2
    # A second run reuses both members (no retraining, no refitting): same numbers.
    again = run_self_influence(Session(config, Reporter()))
    assert not any(m.state.trained_now for m in again.members)
    np.testing.assert_array_equal(again.table["self_influence"].to_numpy(), result.table["self_influence"].to_numpy())


def test_checkpoint_list_ensemble_and_scores(tmp_path):
    base = config_from_dict(synthetic_config(tmp_path))
    data = Session(base, Reporter()).data()
    paths = []
    for seed in (11, 12):
        model = build_model(base.model, tuple(data.input_shape), len(data.class_names), seed=seed)
        train_model(model, data.train, base.train, seed=seed, device=torch.device("cpu"), reporter=Reporter())
        path = tmp_path / f"m{seed}.safetensors"
        save_checkpoint(model, path)
        paths.append(path)
    config = config_from_dict(synthetic_config(tmp_path, ensemble=[str(p) for p in paths]))
    session = Session(config, Reporter())
    assert [s.member for s in ensemble_sessions(session)] == [0, 1]

    queries = tmp_path / "queries.csv"
    pd.DataFrame({"index": [0, 1, 2, 5]}).to_csv(queries, index=False)
    result = run_score(session, queries, top=4)

    test_x, test_y = data.test.inputs[[0, 1, 2, 5]], data.test.labels[[0, 1, 2, 5]]
    matrices = []
    for seed, path in zip((11, 12), paths):
        _, _, model, factors = member_reference(config, data, seed=seed, checkpoint=path)
        # member k's Fisher labels are sampled with seed config.seed + k
        loader = BatchLoader(data.train, config.influence.batch_size)
        factors = fit_factors(model, loader, "ekfac", seed=config.seed + len(matrices))
        matrices.append(pairwise_scores(model, factors, loader, test_x, test_y).double())
    mean = (matrices[0] + matrices[1]) / 2
    table = result.table
    for t, test_id in enumerate(result.queries.ids):
        rows = table[(table.test_id == test_id) & (table.role == "proponent")]
        expected = torch.topk(mean[t], 4).indices.numpy()
        positive = expected[mean[t][expected].numpy() > 0]
        np.testing.assert_array_equal(rows.train_index.to_numpy(), positive)
        np.testing.assert_allclose(rows.influence.to_numpy(), mean[t][positive].numpy(), rtol=1e-4)


def test_ensemble_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="influence.ensemble"):
        config_from_dict(synthetic_config(tmp_path, ensemble=0))
    with pytest.raises(ConfigError, match="influence.ensemble"):
        config_from_dict(synthetic_config(tmp_path, ensemble=[]))
    with pytest.raises(ConfigError, match=r"influence\.ensemble: must be a number of models >= 1 or a list"):
        config_from_dict(synthetic_config(tmp_path, ensemble="abc"))
    with pytest.raises(ConfigError, match="must be a file path"):
        config_from_dict(synthetic_config(tmp_path, ensemble=[1, 2]))
    both = synthetic_config(tmp_path, ensemble=["a.pt", "b.pt"])
    both["model"]["checkpoint"] = "a.pt"
    with pytest.raises(ConfigError, match="remove model.checkpoint"):
        config_from_dict(both)
    trained = synthetic_config(tmp_path, ensemble=3)
    trained["model"]["checkpoint"] = "a.pt"
    with pytest.raises(InflError, match=r"list the checkpoints instead"):
        ensemble_sessions(Session(config_from_dict(trained), Reporter()))


def test_cli_ensemble_flag_and_bad_value(tmp_path):
    path = tmp_path / "ens.yaml"
    path.write_text(yaml.safe_dump(synthetic_config(tmp_path)))
    runner = CliRunner()
    bad = runner.invoke(app, ["self-influence", "-c", str(path), "--set", "influence.ensemble=0"])
    assert bad.exit_code == 2
    assert "influence.ensemble" in bad.output and "Traceback" not in bad.output
    ok = runner.invoke(app, ["self-influence", "-c", str(path), "--set", "influence.ensemble=2", "--top", "3"])
    assert ok.exit_code == 0, ok.output
    assert load_config(str(path), ["influence.ensemble=2"]).influence.ensemble_size() == 2
