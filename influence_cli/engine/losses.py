"""The task loss: what the engine differentiates, samples and curves, per example.

The task follows the labels' dtype: integer labels are classification (cross-entropy on
the logits), floating labels are regression with the squared error
``½‖f(x) − y‖²`` (labels reshaped to the outputs: a model with one output takes labels
of shape (n,)). The ½ makes the output Hessian the identity, so

- per-example gradient: Jᵀ(f − y);
- Gauss-Newton: Jᵀ I J (no output weighting), equal to the true Fisher of
  y ~ N(f(x), I): true-Fisher labels are y = f(x) + ε, ε a counter-based draw of
  (seed, example index, output) like the classification labels; ε is ±1 (Rademacher),
  which has N(0, I)'s second moments, all a Fisher depends on (see fisher_labels);
- the empirical Fisher uses the given y.

Every engine call site of a loss, a measurement, a Fisher label draw or an output-Hessian
product goes through this module, so a new task is one place.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from influence_cli.engine.rng import sample_fisher_labels, splitmix64
from influence_cli.errors import InfluenceError

__all__ = [
    "MEASUREMENTS",
    "is_regression",
    "label_dtype",
    "task_loss",
    "measurement_loss",
    "fisher_labels",
    "output_hessian_product",
    "output_hessian_root",
]

MEASUREMENTS = ("loss", "margin")


def is_regression(labels: Tensor) -> bool:
    """Floating labels mean regression (squared error), integer labels classification."""
    return labels.is_floating_point()


def label_dtype(labels: Tensor) -> torch.dtype:
    """The dtype labels travel in: float32/64 kept for regression, int64 for classes."""
    return labels.dtype if labels.is_floating_point() else torch.long


def _targets(outputs: Tensor, labels: Tensor) -> Tensor:
    if labels.numel() != outputs.numel():
        raise InfluenceError(
            f"regression labels of shape {tuple(labels.shape)} do not match the model's outputs of shape "
            f"{tuple(outputs.shape)}; give one target per output"
        )
    return labels.reshape(outputs.shape).to(outputs.dtype)


def task_loss(outputs: Tensor, labels: Tensor) -> Tensor:
    """Summed per-example training loss: cross-entropy, or ½‖f − y‖² for float labels."""
    if is_regression(labels):
        return 0.5 * (outputs - _targets(outputs, labels)).pow(2).sum()
    return F.cross_entropy(outputs, labels, reduction="sum")


def measurement_loss(logits: Tensor, labels: Tensor, measurement: str = "loss") -> Tensor:
    """Summed per-example objective whose gradient is the test-side g.

    "loss": the task loss. "margin" (classification only): −(logit_y − logsumexp(other
    logits)), so a positive score still means "proponent" (up-weighting the training
    example raises the margin).
    """
    if measurement == "loss":
        return task_loss(logits, labels)
    if measurement == "margin":
        if is_regression(labels):
            raise InfluenceError("measurement 'margin' needs class labels; use 'loss' for regression")
        correct = logits.gather(1, labels[:, None]).squeeze(1)
        is_label = torch.arange(logits.shape[1], device=logits.device) == labels[:, None]
        others = logits.masked_fill(is_label, float("-inf"))
        return -(correct - torch.logsumexp(others, dim=1)).sum()
    raise InfluenceError(f"measurement must be one of {MEASUREMENTS}, not {measurement!r}")


def rademacher(seed: int, index: Tensor, width: int) -> Tensor:
    """(n, width) float64 ±1 draws keyed by (seed, example index, column), counter-based,
    so batching and sharding never change them."""
    idx = index.cpu().numpy().astype(np.uint64)
    key = splitmix64(np.uint64((int(seed) ^ 0x5EED5EED) & ((1 << 64) - 1)))
    with np.errstate(over="ignore"):
        counter = idx[:, None] * np.uint64(width) + np.arange(width, dtype=np.uint64)[None, :]
        bits = splitmix64(counter ^ key) >> np.uint64(63)
    return torch.from_numpy(bits.astype(np.float64) * 2.0 - 1.0)


def fisher_labels(outputs: Tensor, labels: Tensor, seed: int, index: Tensor) -> Tensor:
    """True-Fisher labels drawn from the model's predictive distribution, per example:
    a class from softmax(outputs), or f(x) + ε for regression (``labels`` tells the task
    and the label shape), ε independent ±1 per output: the same second moments as
    N(0, I), which is all the Fisher sees (gradient outer products are quadratic in ε),
    and with one output ε² = 1, so the sampled Fisher is the Gauss-Newton exactly."""
    detached = outputs.detach().to(torch.float64)
    if is_regression(labels):
        noise = rademacher(seed, index, detached[0].numel() if len(detached) else 1).to(detached.device)
        draw = detached.reshape(len(detached), -1) + noise
        return draw.reshape(labels.shape if labels.numel() == draw.numel() else detached.shape).to(labels.dtype)
    return sample_fisher_labels(torch.softmax(detached, dim=-1), seed, index).to(outputs.device)


def output_hessian_product(outputs: Tensor, labels: Tensor, u: Tensor) -> Tensor:
    """H_out u for output-space vectors u (..., n, C): diag(p) − ppᵀ for cross-entropy,
    the identity for squared error."""
    if is_regression(labels):
        return u
    p = torch.softmax(outputs.detach(), dim=-1)
    return p * u - p * (p * u).sum(-1, keepdim=True)


def output_hessian_root(outputs: Tensor, labels: Tensor) -> Tensor:
    """M (C, n, C) with H_out,i = Σ_c m_c,i m_c,iᵀ, indexed [c, i, k], float64.

    Cross-entropy: m_c[k] = √p_c (δ_ck − p_k) (H_out = diag(p) − ppᵀ, Σp = 1);
    squared error: m_c = e_c (H_out = I)."""
    p = torch.softmax(outputs.detach().to(torch.float64), dim=-1)  # (n, C)
    n, classes = p.shape
    eye = torch.eye(classes, dtype=p.dtype, device=p.device)
    if is_regression(labels):
        return eye[:, None, :].expand(classes, n, classes)
    return p.sqrt().T[:, :, None] * (eye[:, None, :] - p[None, :, :])
