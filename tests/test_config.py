"""Config loading: schema validation, error format, bundled configs, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from influence_cli.config import DEFAULT_CONFIG, bundled_configs, config_from_dict, load_config, parse_override
from influence_cli.errors import ConfigError


def write(tmp_path: Path, data: object, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_bundled_configs_all_validate() -> None:
    names = set(bundled_configs())
    assert {"digits-mlp", "digits-cnn", "mnist-cnn", "cifar10-resnet18", "image-folder-example", "table-example"} <= names
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


def test_default_is_digits_mlp() -> None:
    cfg = load_config(None)
    assert cfg.name == DEFAULT_CONFIG == "digits-mlp"
    assert cfg.data.source == "digits"
    assert cfg.influence.strategy == "auto"


def test_all_errors_reported_at_once_with_dotted_paths(tmp_path: Path) -> None:
    path = write(tmp_path, {"name": "x", "trian": {}, "train": {"epochs": "many", "lr": -1}, "data": {"source": "nope"}})
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    problems = info.value.problems
    text = "\n".join(problems)
    assert f"{path}: trian: unknown key" in text
    assert f"{path}: train.epochs:" in text
    assert f"{path}: train.lr:" in text
    assert f"{path}: data.source:" in text
    assert len(problems) == 4


def test_nested_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, {"name": "x", "data": {"label_noise": {"fracton": 0.1}}})
    with pytest.raises(ConfigError, match=r"data\.label_noise\.fracton: unknown key"):
        load_config(str(path))


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    sub = tmp_path / "exp"
    sub.mkdir()
    path = write(sub, {"name": "t", "data": {"source": "table", "path": "rows.csv"}})
    cfg = load_config(str(path))
    assert cfg.resolve_path(cfg.data.path) == sub.resolve() / "rows.csv"


def test_overrides_typed_and_validated() -> None:
    cfg = load_config("digits-mlp", ["train.epochs=5", "influence.damping=0.01", "data.label_noise.fraction=0.1"])
    assert cfg.train.epochs == 5 and isinstance(cfg.train.epochs, int)
    assert cfg.influence.damping == pytest.approx(0.01)
    assert cfg.data.label_noise.fraction == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"train\.epochz: unknown key"):
        load_config("digits-mlp", ["train.epochz=5"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("train.epochs")


def test_damping_rules() -> None:
    assert config_from_dict({"name": "a", "influence": {"damping": "auto"}}).influence.damping == "auto"
    with pytest.raises(ConfigError, match=r"influence\.damping: must be 'auto' or a number"):
        config_from_dict({"name": "a", "influence": {"damping": "lots"}})
    with pytest.raises(ConfigError, match=r"influence\.damping"):
        config_from_dict({"name": "a", "influence": {"damping": -1}})


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="no such config file or bundled config"):
        load_config(str(tmp_path / "missing.yaml"))


def test_source_needs_paths() -> None:
    with pytest.raises(ConfigError, match="data: source 'table' needs data.path"):
        config_from_dict({"name": "a", "data": {"source": "table"}})
    with pytest.raises(ConfigError, match="give both train_path and test_path"):
        config_from_dict({"name": "a", "data": {"source": "image_folder", "train_path": "x"}})


def test_factory_requires_arch() -> None:
    with pytest.raises(ConfigError, match="model.arch: factory"):
        config_from_dict({"name": "a", "model": {"factory": "m:f"}})
    cfg = config_from_dict({"name": "a", "model": {"arch": "factory", "factory": "m:f"}})
    assert cfg.model.factory == "m:f"


def test_roundtrip_yaml() -> None:
    cfg = load_config("digits-cnn")
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again.model_dump() == cfg.model_dump()


def test_strategy_checked_at_load_against_the_registry() -> None:
    from influence_cli.engine import strategy_names as available_strategies

    for name in available_strategies():
        assert config_from_dict({"name": "a", "influence": {"strategy": name}}).influence.strategy == name
    with pytest.raises(ConfigError) as info:
        config_from_dict({"name": "a", "influence": {"strategy": "ekfak"}}, label="exp.yaml")
    names = ", ".join(["auto", *available_strategies()])  # auto: resolved by app.choice
    assert config_from_dict({"name": "a", "influence": {"strategy": "auto"}}).influence.strategy == "auto"
    assert info.value.problems == [
        f"exp.yaml: influence.strategy: unknown strategy 'ekfak' (did you mean ekfac?); use one of {names}"
    ]


def test_model_arch_checked_at_load() -> None:
    for arch in ("mlp", "cnn", "resnet18", "mobilenet_v3_small"):
        assert config_from_dict({"name": "a", "model": {"arch": arch}}).model.arch == arch
    with pytest.raises(ConfigError) as info:
        config_from_dict({"name": "a", "model": {"arch": "resnet1"}}, label="exp.yaml")
    (line,) = info.value.problems
    assert line.startswith("exp.yaml: model.arch: unknown architecture 'resnet1' (did you mean resnet18")
    assert line.endswith("use mlp, cnn, factory or a torchvision classification model such as resnet18")
    # torchvision's detection models are not classifiers with num_classes
    with pytest.raises(ConfigError, match=r"model\.arch: unknown architecture 'fasterrcnn_resnet50_fpn'"):
        config_from_dict({"name": "a", "model": {"arch": "fasterrcnn_resnet50_fpn"}})


@pytest.mark.parametrize(
    "section,expected",
    [
        ({"data": {"source": "mnist"}}, "data: source 'mnist' needs data.root"),
        ({"data": {"feature_columns": []}}, "data.feature_columns: the list is empty"),
        ({"data": {"feature_columns": ["a", "b", "a"]}}, "data.feature_columns: column 'a' is listed twice"),
        ({"data": {"feature_columns": ["a", "label"]}}, "data: data.feature_columns lists 'label'"),
        ({"data": {"id_column": "label"}}, "data: data.id_column and data.label_column are both 'label'"),
        ({"influence": {"modules": []}}, "influence.modules: the list is empty, so no layer would be tracked"),
    ],
)
def test_other_fields_checked_at_load(section: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"name": "a", **section}, label="exp.yaml")
    (line,) = info.value.problems
    assert line.startswith(f"exp.yaml: {expected}"), line
