"""The damping λ in (H + λI)⁻¹: ``auto`` = factor × the mean curvature eigenvalue, or one
positive number. Each strategy carries its measured default factor
(``Strategy.default_damping_factor``; docs/damping.md)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from influence_cli.errors import InfluenceError

__all__ = ["AUTO_DAMPING_SCALE", "damping_value", "check_damping"]

AUTO_DAMPING_SCALE = 0.1


def damping_value(rule: str | float, lam: Tensor, factor: float = AUTO_DAMPING_SCALE) -> float:
    """λ for eigenvalues ``lam`` under ``rule`` ("auto" or a positive number)."""
    if isinstance(rule, str):
        if rule != "auto":
            raise InfluenceError(f"damping must be 'auto' or a positive number, not {rule!r}")
        value = float(factor) * float(lam.to(torch.float64).mean())
        # A layer whose curvature is exactly zero gets λ = 1 (plain gradients) instead of 0.
        return value if value > 0.0 else 1.0
    value = float(rule)
    if not math.isfinite(value) or value <= 0.0:
        raise InfluenceError(f"damping must be 'auto' or a positive number, not {rule!r}")
    return value


def check_damping(rule: str | float, factor: float) -> None:
    """Refuse a bad damping rule or factor before any data pass."""
    damping_value(rule, torch.ones(1), factor)
    if not (math.isfinite(float(factor)) and float(factor) > 0):
        raise InfluenceError(f"damping_factor must be a positive number, not {factor!r}")
