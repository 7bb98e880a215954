"""Every numeric config field has its valid range, refused at load time with the dotted key.

The table below lists, for each numeric field of the schema, values just inside its range
(accepted) and just outside (refused). `test_every_numeric_field_is_in_the_table` walks the
schema so that a new numeric field cannot be added without a range and a row here.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.config import MAX_SEED, Config, config_from_dict, load_config
from influence_cli.errors import ConfigError

# key: (accepted values, refused values, key named in the message when it differs)
BOUNDS: dict[str, tuple[list[Any], list[Any]]] = {
    "seed": ([0, MAX_SEED], [-1, MAX_SEED + 1]),
    "data.test_fraction": ([0.01, 0.99], [0, 0.0, 1, 1.0, -0.5]),
    "data.limit": ([1, None], [0, -3]),
    "data.image_size": ([[1, 1], [28, 28]], [[0, 1], [1, 0], [1], [1, 1, 1]]),
    "data.synthetic.num_train": ([1], [0]),
    "data.synthetic.num_test": ([1], [0]),
    "data.synthetic.shape": ([[1], [3, 1, 1]], [[0], [3, 0, 2], []]),
    "data.synthetic.num_classes": ([2], [1, 0]),
    "data.synthetic.separation": ([0, 0.0], [-0.1]),
    "data.label_noise.fraction": ([0, 1], [-0.01, 1.01]),
    "data.label_noise.seed": ([0, MAX_SEED], [-1, MAX_SEED + 1]),
    "model.hidden_sizes": ([[], [1], [3, 1]], [[0], [4, 0], [-2]]),
    "model.channels": ([[1], [1, 1]], [[0], [8, 0], []]),
    "train.epochs": ([1], [0, -1]),
    "train.batch_size": ([1], [0]),
    "train.lr": ([1e-8], [0, 0.0, -1e-3]),
    "train.momentum": ([0, 0.999], [-0.1, 1, 1.0]),
    "train.weight_decay": ([0, 0.0], [-1e-9]),
    "influence.damping": ([0, 0.0, 1e-9, "auto"], [-1e-9, -1]),
    "influence.damping_factor": ([1e-6, None], [0, -1]),
    "influence.ensemble": ([1, 2], [0, -1]),
    "influence.exact.max_params": ([1], [0]),
    "influence.lissa.depth": ([1], [0]),
    "influence.lissa.scale": ([1e-6, "auto"], [0, -1]),
    "influence.lissa.damping": ([1e-6, "auto", None], [0, -1]),
    "influence.lissa.repeats": ([1], [0]),
    "influence.lissa.batch_size": ([1], [0]),
    "influence.batch_size": ([1], [0]),
    "influence.num_workers": ([0], [-1]),
    "influence.query_rank": ([0, 32], [-1]),
    "audit.top": ([1], [0]),
    "audit.flag.k": ([0, 0.0, 1.5], [-0.1]),
    "audit.flag.fraction": ([1e-6, 1], [0, 1.01]),
    "audit.check.max_flagged_fraction": ([0, 1, None], [-0.01, 1.01]),
    "audit.check.max_flagged": ([0, None], [-1]),
}


def nested(key: str, value: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "bounds"}
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return data


def get(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def cases(which: int) -> list[Any]:
    return [pytest.param(key, value, id=f"{key}={value!r}") for key, pair in BOUNDS.items() for value in pair[which]]


@pytest.mark.parametrize("key,value", cases(0))
def test_value_inside_the_range_is_accepted(key: str, value: Any) -> None:
    config = config_from_dict(nested(key, value))
    got = get(config, key)
    assert got == value or (value == "auto" and got == "auto")


@pytest.mark.parametrize("key,value", cases(1))
def test_value_outside_the_range_is_refused_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(nested(key, value), label="exp.yaml")
    problems = info.value.problems
    assert len(problems) == 1, problems
    line = problems[0]
    assert "\n" not in line
    # the dotted key, optionally followed by the list index that is out of range
    assert line.startswith(f"exp.yaml: {key}: ") or line.startswith(f"exp.yaml: {key}["), line


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("train.epochs", 0, "train.epochs: 0 is out of range; use a number >= 1"),
        ("train.momentum", 1.0, "train.momentum: 1.0 is out of range; use a number < 1.0"),
        ("data.test_fraction", 0, "data.test_fraction: 0 is out of range; use a number > 0.0"),
        ("model.hidden_sizes", [8, 0], "model.hidden_sizes[1]: 0 is out of range; use a number >= 1"),
        ("model.channels", [], "model.channels: needs at least 1 entry, got 0"),
        ("data.synthetic.shape", [3, 0, 4], "data.synthetic.shape[1]: 0 is out of range; use a number >= 1"),
        ("seed", MAX_SEED + 1, f"seed: {MAX_SEED + 1} is out of range; use a number <= {MAX_SEED}"),
        ("train.epochs", True, "train.epochs: true is a YAML boolean, not a number; write a number"),
        ("train.lr", float("inf"), "train.lr: inf is not a finite number; use a finite number"),
        ("audit.flag.k", float("nan"), "audit.flag.k: nan is not a finite number; use a finite number"),
        ("influence.damping", float("inf"), "influence.damping: must be 'auto' or a number >= 0"),
        ("influence.lissa.scale", True, "influence.lissa.scale: must be 'auto' or a number > 0"),
    ],
)
def test_refusal_messages(key: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(nested(key, value), label="exp.yaml")
    assert info.value.problems == [f"exp.yaml: {expected}"]


def _numeric(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _numeric(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list):
        return any(_numeric(arg) for arg in typing.get_args(annotation))
    return annotation in (int, float)


def _numeric_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    found = set()
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found |= _numeric_fields(annotation, f"{prefix}{name}.")
        elif _numeric(annotation):
            found.add(prefix + name)
    return found


def test_every_numeric_field_is_in_the_table() -> None:
    from influence_cli.config import config_model

    assert _numeric_fields(config_model()) == set(BOUNDS)  # with every strategy's section


def test_bounds_apply_to_yaml_files_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "train": {"epochs": 0}, "model": {"hidden_sizes": [0]}}))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.problems == [
        f"{path}: model.hidden_sizes[0]: 0 is out of range; use a number >= 1",
        f"{path}: train.epochs: 0 is out of range; use a number >= 1",
    ]
    with pytest.raises(ConfigError, match=r"^digits-mlp \(bundled\): train\.batch_size: 0 is out of range"):
        load_config("digits-mlp", ["train.batch_size=0"])
    assert load_config("digits-mlp", ["train.epochs=1"]).train.epochs == 1


@pytest.mark.parametrize(
    "command,override,key",
    [
        (["config", "show"], "train.epochs=0", "train.epochs"),
        (["train"], "train.epochs=0", "train.epochs"),
        (["self-influence"], "model.hidden_sizes=[0]", "model.hidden_sizes[0]"),
        (["fit-factors"], "data.synthetic.shape=[3,0]", "data.synthetic.shape[1]"),
        (["check"], "audit.flag.fraction=0", "audit.flag.fraction"),
        (["score", "rows.csv"], "seed=-1", "seed"),
        (["train"], "train.lr=.inf", "train.lr"),
        (["train"], "train.epochs=yes", "train.epochs"),
    ],
)
def test_cli_refuses_out_of_range_override(command: list[str], override: str, key: str) -> None:
    result = CliRunner().invoke(app, [*command, "--set", override])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: digits-mlp (bundled): {key}: "), lines[0]
    assert result.stdout == ""
