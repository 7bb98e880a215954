"""Model construction and checkpoints.

`build_model` turns the `model` config section plus the data's input shape and class count
into an `nn.Module`; checkpoints are plain state_dicts, stored as safetensors. Loading a
user's `.pt`/`.pth` goes through `torch.load(weights_only=True)` so no arbitrary object is
ever unpickled.
"""

from __future__ import annotations

import inspect
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from influence_cli.config import ModelConfig
from influence_cli.errors import CheckpointError, ModelError


def _mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    width = 1
    for size in input_shape:
        width *= size
    layers: list[nn.Module] = [nn.Flatten()]
    for hidden in cfg.hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _cnn(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A small conv net for inputs from 1x8x8 up to 3x32x32 and beyond.

    3x3 convolutions with padding keep the size; a 2x2 max-pool follows each conv except
    the last while the feature map is at least 4 pixels wide, and an adaptive average pool
    to 2x2 keeps a little spatial layout before the classifier.
    """
    if len(input_shape) != 3:
        raise ModelError(f"model.arch: cnn needs image inputs (C, H, W), the data gives shape {tuple(input_shape)}")
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for i, out_channels in enumerate(cfg.channels):
        layers += [nn.Conv2d(channels, out_channels, kernel_size=3, padding=1), nn.ReLU()]
        channels = out_channels
        if i < len(cfg.channels) - 1 and min(height, width) >= 4:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
    pooled = (min(2, height), min(2, width))
    layers += [nn.AdaptiveAvgPool2d(pooled), nn.Flatten(), nn.Linear(channels * pooled[0] * pooled[1], num_classes)]
    return nn.Sequential(*layers)


def _torchvision(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    import torchvision.models

    builder = getattr(torchvision.models, cfg.arch, None)
    if builder is None or not callable(builder) or cfg.arch.startswith("_"):
        raise ModelError(
            f"model.arch: unknown architecture '{cfg.arch}' (use mlp, cnn, factory or a torchvision model such as resnet18)"
        )
    if len(input_shape) != 3 or input_shape[0] != 3:
        raise ModelError(
            f"model.arch: torchvision '{cfg.arch}' expects 3-channel images; the data gives shape {tuple(input_shape)}"
        )
    try:
        return builder(weights=None, num_classes=num_classes)
    except TypeError as exc:
        raise ModelError(f"model.arch: torchvision '{cfg.arch}' cannot be built here: {exc}") from None


def _names_parameter(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function``'s signature has a parameter called ``name`` that can be passed by
    keyword (not merely absorbed by ``**kwargs``)."""
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    param = params.get(name)
    return param is not None and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _factory(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    assert cfg.factory is not None
    from influence_cli.plugins import import_callable

    function = import_callable(cfg.factory, cfg.factory_path, "model.factory", ModelError)
    kwargs = dict(cfg.factory_kwargs)
    # input_shape / num_classes only go to a factory that names them: one taking **kwargs
    # (torchvision's resnet18 forwards them to ResNet.__init__) gets factory_kwargs alone.
    for key, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
        if _names_parameter(function, key):
            kwargs.setdefault(key, value)
    try:
        model = function(**kwargs)
    except Exception as exc:
        raise ModelError(f"model.factory: '{cfg.factory}' raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.factory: '{cfg.factory}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    """Build the configured model with seeded initial weights."""
    torch.manual_seed(seed)
    if cfg.arch == "mlp":
        return _mlp(cfg, input_shape, num_classes)
    if cfg.arch == "cnn":
        return _cnn(cfg, input_shape, num_classes)
    if cfg.arch == "factory":
        return _factory(cfg, input_shape, num_classes)
    return _torchvision(cfg, input_shape, num_classes)


def check_model_fits(model: nn.Module, cfg: ModelConfig, sample: torch.Tensor, num_classes: int) -> None:
    """One forward pass on a couple of training inputs, before any training: a model that
    cannot take the data's inputs, or does not give one logit per class, is a config
    problem (one line, exit 2), not a crash in the middle of training."""
    what = f"model.arch {cfg.arch}" + (f" ({cfg.factory})" if cfg.factory else "")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"{what}: cannot take the data's inputs of shape {tuple(sample.shape[1:])}: {reason}; "
            "choose a model for this input shape (or resize the data: data.image_size, data.grayscale)"
        ) from None
    finally:
        model.train(was_training)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape != (len(sample), num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelError(
            f"{what}: gives outputs of shape {shape} for {len(sample)} inputs, expected ({len(sample)}, {num_classes}) "
            f"logits (one per class); set the model's number of outputs to {num_classes} (e.g. factory_kwargs: "
            f"{{num_classes: {num_classes}}})"
        )


# ----------------------------------------------------------------------------- checkpoints


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from .safetensors or .pt/.pth without unpickling objects."""
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file (check model.checkpoint)")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found (check model.checkpoint)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"{path}: unknown checkpoint format '{suffix}' (use .safetensors, .pt or .pth)")
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        # torch's weights_only refusal spans many lines (and suggests weights_only=False): one line here
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise CheckpointError(
                f"{path}: holds a pickled Python object ({found.group(1)}), not only tensors, and is not "
                "unpickled for safety; save a plain state_dict (torch.save(model.state_dict(), path)) or "
                "convert it to .safetensors"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        reason = detail.group(1).strip() if detail else (text.strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{path}: cannot read checkpoint (corrupt, truncated or not a state_dict): {reason[:200]}"
        ) from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint (corrupt, truncated or not a state_dict): {first[:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: does not hold a state_dict of tensors")
    return state


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a state_dict into the model, naming any missing, extra or mis-shaped parameter."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise CheckpointError(f"{path}: does not match the configured model ({'; '.join(parts)})")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: parameter '{key}' has shape {tuple(state[key].shape)} in the checkpoint "
                f"but {tuple(tensor.shape)} in the model"
            )
    model.load_state_dict(state)


def save_checkpoint(model: nn.Module, path: Path) -> None:
    """Save the state_dict as safetensors, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    from influence_cli.run import atomic_path

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
