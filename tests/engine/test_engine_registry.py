"""Every registered strategy is wired everywhere: CLI choices and help, config options,
a damping default, and it scores a tiny model."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.commands.common import STRATEGY_HELP
from influence_cli.config import load_config
from influence_cli.errors import ConfigError
from influence_cli.engine import (
    fit_factors,
    get_strategy,
    option_specs,
    options_dict,
    pairwise_scores,
    self_influence,
    strategy_names,
)
from engine_helpers import batches, make_data, make_mlp, seeded

NAMES = strategy_names()
# Settings that keep each strategy quick on a tiny model (its own options).
QUICK = {"lissa": {"depth": 20, "batch_size": 10_000}}
TINY = {
    "name": "tiny-registry",
    "seed": 0,
    "data": {"source": "synthetic", "synthetic": {"num_train": 40, "num_test": 8, "shape": [5], "num_classes": 3}},
    "model": {"arch": "mlp", "hidden_sizes": [4]},
    "train": {"epochs": 2, "batch_size": 20, "lr": 0.01, "device": "cpu"},
    "influence": {"batch_size": 20, "device": "cpu"},
}


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def flat_help(text: str) -> str:
    """Rendered help without box drawing and line wrapping."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output": {"dir": str(root / "runs")}}))
    return path


def test_the_builtins_are_registered():
    assert NAMES[:6] == ["ekfac", "kfac", "diagonal", "identity", "exact", "lissa"]


@pytest.mark.parametrize("name", NAMES)
def test_listed_in_cli_help(name):
    cls = get_strategy(name)
    assert f"{name}: {cls.description}" in STRATEGY_HELP
    for command in ("fit-factors", "self-influence", "score", "check", "report"):
        shown = flat_help(cli(command, "--help").output)
        assert f"{name}: {cls.description}" in shown, (command, name)


@pytest.mark.parametrize("name", NAMES)
def test_accepted_by_strategy_option(name, tiny):
    sets = [f"influence.{name}.{key}={value}" for key, value in QUICK.get(name, {}).items()]
    result = cli("fit-factors", "-c", str(tiny), "-s", name, *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    assert f"fitted {name}" in result.output or "reusing" in result.output
    assert (tiny.parent / "runs" / "tiny-registry" / "factors" / name / "meta.json").is_file()
    config = load_config(str(tiny), [f"influence.strategy={name}"])
    assert config.influence.strategy == name


def test_unknown_strategy_is_refused_by_cli_and_config(tiny):
    bad = cli("fit-factors", "-c", str(tiny), "-s", "magic")
    assert bad.exit_code == 2 and "unknown strategy 'magic'" in bad.output and ", ".join(NAMES) in bad.output
    with pytest.raises(ConfigError, match=r"influence\.strategy: unknown strategy 'magic'"):
        load_config(str(tiny), ["influence.strategy=magic"])


@pytest.mark.parametrize("name", NAMES)
def test_options_validated_through_the_config(name, tiny):
    cls = get_strategy(name)
    config = load_config(str(tiny))
    if cls.options_type is None:
        assert config.influence.strategy_options(name) is None
        with pytest.raises(ConfigError, match=rf"influence\.{name}: unknown key"):
            load_config(str(tiny), [f"influence.{name}.anything=1"])
        return
    # Defaults: the dataclass's own, and they construct the options.
    assert config.influence.strategy_options(name) == options_dict(cls.options_type())
    assert cls(config.influence.strategy_options(name)).options == cls.options_type()
    with pytest.raises(ConfigError, match=rf"influence\.{name}\.nope: unknown key"):
        load_config(str(tiny), [f"influence.{name}.nope=1"])
    for spec in option_specs(cls.options_type):
        for bound, limit in spec.bounds.items():
            bad = limit - 1 if bound in ("ge", "gt") else limit + 1
            with pytest.raises(ConfigError, match=rf"influence\.{name}\.{spec.name}:"):
                load_config(str(tiny), [f"influence.{name}.{spec.name}={bad}"])
            with pytest.raises(ValueError, match=spec.name):
                cls.options_type(**{spec.name: bad})


@pytest.mark.parametrize("name", NAMES)
def test_has_a_damping_default(name):
    factor = get_strategy(name).default_damping_factor
    assert isinstance(factor, float) and math.isfinite(factor) and factor > 0


@pytest.mark.parametrize("name", NAMES)
def test_scores_a_tiny_model(name):
    model = seeded(make_mlp)
    x, y = make_data((6,), 16)
    loader = batches(x, y, 8)
    factors = fit_factors(model, loader, name, dtype=torch.float64, options=QUICK.get(name))
    assert factors.strategy == name
    scores = self_influence(model, factors, loader)
    assert scores.shape == (16,) and bool(torch.isfinite(scores).all())
    if get_strategy(name).psd:
        assert bool((scores >= 0).all())
    pair = pairwise_scores(model, factors, loader, x[:3], y[:3])
    assert pair.shape == (3, 16) and bool(torch.isfinite(pair).all())


def test_a_strategy_without_its_required_hooks_is_refused_when_defined():
    from influence_cli.engine import STRATEGIES, BlockStrategy, Strategy

    with pytest.raises(ValueError, match="'half_block' does not implement fit_layers"):

        class HalfBlock(BlockStrategy):
            name = "half_block"
            description = "a block strategy that forgot fit_layers"

    with pytest.raises(ValueError, match="'no_hooks' does not implement fit, load"):

        class NoHooks(Strategy):
            name = "no_hooks"
            description = "a strategy with neither fit nor load"

    assert "half_block" not in STRATEGIES and "no_hooks" not in STRATEGIES
