"""Which layers are tracked, their weight-matrix shapes and column orders.

A tracked layer's weight is seen as one matrix W (d_out × d_in) with the bias folded in
as the last input column (conv weights as ``weight.reshape(d_out, -1)``). Conv patches
are captured in an internal column order that is cheaper to gather; ``column_order``
maps it to the weight's.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from influence_cli.errors import FactorsError, InfluenceError

__all__ = [
    "TRACKED_TYPES",
    "select_modules",
    "tracked_modules",
    "layer_kind",
    "layer_shape",
    "eval_mode",
    "unsupported_reason",
    "column_order",
    "to_weight_order",
    "to_internal_order",
    "check_tracked",
]

TRACKED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a Linear/Conv2d cannot be tracked (its gradient is not sum_p g a^T), or None."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
    return None


def layer_kind(module: nn.Module) -> str:
    """'linear' or 'conv2d' (subclasses count)."""
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Linear):
        return "linear"
    raise InfluenceError(f"module of type {type(module).__name__} cannot be tracked")


def layer_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(d_out, d_in, has_bias) of the weight matrix with the bias folded in as a column."""
    weight = module.weight
    has_bias = getattr(module, "bias", None) is not None
    d_out = weight.shape[0]
    d_in = weight[0].numel() + (1 if has_bias else 0)
    return d_out, d_in, has_bias


def select_modules(model: nn.Module, patterns: list[str] | None = None) -> dict[str, nn.Module]:
    """The tracked layers of ``model`` by qualified name.

    Every ``nn.Linear`` and ``nn.Conv2d`` (subclasses included), or only those whose name
    matches one of the fnmatch ``patterns``. Parameterised modules that stay untracked
    (BatchNorm, Embedding, grouped convolutions...) are listed in one warning, because
    their parameters silently drop out of the influence estimate. Without patterns, a
    model's own ``influence_modules`` list of patterns is the default (the Hugging Face
    wrapper declares the last blocks' projections and the head there, and says so).
    """
    declared = getattr(model, "influence_modules", None) if patterns is None else None
    if declared is not None:
        patterns = list(declared)
    tracked: dict[str, nn.Module] = {}
    untracked: list[str] = []
    candidates: list[str] = []
    for name, module in model.named_modules():
        label = name or "<root>"
        if isinstance(module, TRACKED_TYPES):
            reason = unsupported_reason(module)
            if reason is not None:
                untracked.append(f"{label} ({type(module).__name__}, {reason})")
                continue
            candidates.append(label)
            if patterns is None or any(fnmatchcase(name, p) for p in patterns):
                tracked[name] = module
        elif any(True for _ in module.parameters(recurse=False)):
            untracked.append(f"{label} ({type(module).__name__})")
    if untracked and declared is None:
        warnings.warn(
            "influence: parameters of these modules are not tracked (only Linear and "
            "ungrouped zero-padded Conv2d are): " + ", ".join(untracked),
            stacklevel=2,
        )
    if not tracked:
        if patterns is not None:
            hint = f"no Linear/Conv2d module matches the patterns {list(patterns)}"
            if candidates:
                shown = ", ".join(candidates[:20]) + (" ..." if len(candidates) > 20 else "")
                hint += f"; trackable modules are: {shown}"
        else:
            hint = "the model has no Linear or Conv2d module that can be tracked"
        raise InfluenceError(f"nothing to track: {hint}")
    return tracked


def tracked_modules(model: nn.Module, modules: list[str] | dict[str, nn.Module] | None) -> dict[str, nn.Module]:
    """A ready {name: module} selection, or the layers matching ``modules`` patterns."""
    tracked = modules if isinstance(modules, dict) else select_modules(model, modules)
    if not tracked:
        raise InfluenceError("nothing to track: the module selection is empty")
    return tracked


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run in eval mode (deterministic dropout/BatchNorm), restoring every submodule's mode."""
    previous = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in previous:
            module.training = mode


def column_order(module: nn.Module) -> Tensor | None:
    """perm with internal input column j = weight column perm[j]; None if identical.

    Linear inputs are captured in weight order. Conv2d patches are captured in (kh, kw, C)
    order (see ``capture.conv_patches``); the weight flattens as (C, kh, kw).
    """
    if not isinstance(module, nn.Conv2d):
        return None
    kh, kw = module.kernel_size
    channels = module.weight.shape[1]
    weight_index = torch.arange(channels * kh * kw).view(channels, kh, kw)
    perm = weight_index.permute(1, 2, 0).reshape(-1)
    if getattr(module, "bias", None) is not None:
        perm = torch.cat([perm, torch.tensor([channels * kh * kw])])
    if torch.equal(perm, torch.arange(perm.numel())):
        return None
    return perm


def to_weight_order(t: Tensor, perm: Tensor | None, dim: int = -1) -> Tensor:
    """Reorder internal columns of ``t`` along ``dim`` into the weight's column order."""
    if perm is None:
        return t
    inverse = torch.argsort(perm).to(t.device)
    return t.index_select(dim, inverse)


def to_internal_order(t: Tensor, perm: Tensor | None, dim: int = -1) -> Tensor:
    """Reorder weight-order columns of ``t`` along ``dim`` into the internal order."""
    if perm is None:
        return t
    return t.index_select(dim, perm.to(t.device))


def check_tracked(
    model: nn.Module, layers: dict[str, tuple[str, int, int, bool]]
) -> dict[str, nn.Module]:
    """The model's modules matching stored {name: (kind, d_out, d_in, has_bias)};
    FactorsError on any mismatch (stale or foreign factors)."""
    named = dict(model.named_modules())
    modules: dict[str, nn.Module] = {}
    for name, (stored_kind, d_out, d_in, has_bias) in layers.items():
        module = named.get(name)
        if module is None:
            raise FactorsError(
                f"factors track module {name!r} that the model does not have; re-run fit-factors"
            )
        try:
            kind = layer_kind(module)
        except InfluenceError:
            kind = type(module).__name__
        shape = layer_shape(module) if hasattr(module, "weight") else None
        if kind != stored_kind or shape != (d_out, d_in, has_bias):
            raise FactorsError(
                f"factors for module {name!r} ({stored_kind}, {d_out}x{d_in}) do "
                f"not match the model's ({kind}, {shape}); re-run fit-factors"
            )
        modules[name] = module
    return modules
