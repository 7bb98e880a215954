"""Model construction and checkpoint loading."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from torch import nn

from influence_cli.config import ModelConfig
from influence_cli.errors import CheckpointError, ModelError
from influence_cli.models import build_model, load_checkpoint, read_state_dict, save_checkpoint


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28), (3, 16, 20)])
def test_cnn_adapts_to_input_shape(shape: tuple[int, ...]) -> None:
    model = build_model(ModelConfig(arch="cnn", channels=[8, 16, 16]), shape, 7)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert any(isinstance(m, nn.Conv2d) for m in model.modules())


def test_mlp_widths_and_seed() -> None:
    cfg = ModelConfig(arch="mlp", hidden_sizes=[16, 8])
    a, b = build_model(cfg, (5,), 3, seed=1), build_model(cfg, (5,), 3, seed=1)
    linears = [m for m in a.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(5, 16), (16, 8), (8, 3)]
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_torchvision_model() -> None:
    model = build_model(ModelConfig(arch="resnet18"), (3, 32, 32), 4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ModelError, match="3-channel"):
        build_model(ModelConfig(arch="resnet18"), (1, 8, 8), 4)
    # the config refuses unknown names at load time; build_model still names the key for library callers
    with pytest.raises(ModelError, match="unknown architecture 'resnet999'"):
        build_model(ModelConfig.model_construct(arch="resnet999"), (3, 32, 32), 4)


def test_factory(tmp_path: Path) -> None:
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "def make(input_shape, num_classes, width=4):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.ReLU(), nn.Linear(width, num_classes))\n"
        "def bad():\n    return 3\n"
    )
    cfg = ModelConfig(arch="factory", factory="mymodels:make", factory_path=str(tmp_path), factory_kwargs={"width": 6})
    model = build_model(cfg, (5,), 3)
    assert model[1].out_features == 6
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        build_model(ModelConfig(arch="factory", factory="mymodels:bad", factory_path=str(tmp_path)), (5,), 3)
    with pytest.raises(ModelError, match="has no function 'nothere'"):
        build_model(ModelConfig(arch="factory", factory="mymodels:nothere", factory_path=str(tmp_path)), (5,), 3)
    with pytest.raises(ModelError, match="cannot import 'no_such_module_xyz'"):
        build_model(ModelConfig(arch="factory", factory="no_such_module_xyz:f"), (5,), 3)


def small() -> nn.Module:
    return build_model(ModelConfig(arch="mlp", hidden_sizes=[4]), (3,), 2)


def test_checkpoint_roundtrip_safetensors_and_pt(tmp_path: Path) -> None:
    model = small()
    save_checkpoint(model, tmp_path / "w.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        other = build_model(ModelConfig(arch="mlp", hidden_sizes=[4]), (3,), 2, seed=5)
        load_checkpoint(other, tmp_path / name)
        for a, b in zip(model.state_dict().values(), other.state_dict().values()):
            assert torch.equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_errors(tmp_path: Path) -> None:
    model = small()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(model, tmp_path / "missing.pt")
    bad_shape = {k: v for k, v in model.state_dict().items()}
    bad_shape["1.weight"] = torch.zeros(5, 3)
    torch.save(bad_shape, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"'1.weight' has shape \(5, 3\) in the checkpoint but \(4, 3\)"):
        load_checkpoint(model, tmp_path / "shape.pt")
    save_checkpoint(model, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(model, tmp_path / "trunc.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(tmp_path / "junk.pt")
    missing = dict(model.state_dict())
    missing.pop("3.bias")
    torch.save(missing, tmp_path / "missing_key.pt")
    with pytest.raises(CheckpointError, match=r"missing 3\.bias"):
        load_checkpoint(model, tmp_path / "missing_key.pt")


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"w": collections.OrderedDict(a=print)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "evil.pt")


def test_factory_gets_input_shape_and_num_classes_only_when_named(tmp_path: Path) -> None:
    (tmp_path / "kwfactories.py").write_text(
        "import torch.nn as nn\n"
        "SEEN = {}\n"
        "def any_kwargs(**kwargs):\n"
        "    SEEN['any_kwargs'] = dict(kwargs)\n"
        "    return nn.Linear(kwargs.get('width', 5), 3)\n"
        "def named_classes(*, num_classes, **kwargs):\n"
        "    SEEN['named_classes'] = dict(kwargs, num_classes=num_classes)\n"
        "    return nn.Linear(5, num_classes)\n"
    )
    import importlib
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("kwfactories")
        build_model(ModelConfig(arch="factory", factory="kwfactories:any_kwargs", factory_kwargs={"width": 5}), (5,), 3)
        assert module.SEEN["any_kwargs"] == {"width": 5}  # no input_shape, no num_classes
        build_model(ModelConfig(arch="factory", factory="kwfactories:named_classes"), (5,), 4)
        assert module.SEEN["named_classes"] == {"num_classes": 4}  # named: passed; input_shape: not named
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("kwfactories", None)


def test_factory_torchvision_resnet18_with_factory_kwargs() -> None:
    cfg = ModelConfig(arch="factory", factory="torchvision.models:resnet18", factory_kwargs={"num_classes": 10})
    model = build_model(cfg, (3, 32, 32), 10)  # weights=None is torchvision's default: no download
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_model_that_cannot_take_the_data_is_a_one_line_config_error(tmp_path) -> None:
    """resnet18 (3 channels) on the 1-channel digits, and a head with the wrong number of
    outputs: refused before training with exit 2, not an internal error mid-training."""
    from typer.testing import CliRunner

    from influence_cli.cli import app

    (tmp_path / "wrong_head.py").write_text(
        "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))\n"
    )
    common = ["--set", f"output.dir={tmp_path / 'runs'}", "--set", "train.epochs=1", "--set", "model.arch=factory"]
    cases = {
        "torchvision.models:resnet18": ("cannot take the data's inputs of shape (1, 8, 8)", ["--set", "model.factory_kwargs={num_classes: 10}"]),
        "wrong_head:build": ("gives outputs of shape (2, 3) for 2 inputs, expected (2, 10)", ["--set", f"model.factory_path={tmp_path}"]),
    }
    for factory, (expected, extra) in cases.items():
        result = CliRunner().invoke(app, ["train", *common, "--set", f"model.factory={factory}", *extra])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: model.arch factory") and expected in lines[0], lines
        assert not (tmp_path / "runs" / "digits-mlp" / "checkpoint.safetensors").exists()
