"""Parameter corrections from influence: remove or relabel a set S without retraining.

With n training examples, ℓ_i the loss of example i and P = (H + λI)⁻¹ from any fitted
strategy (H the curvature of the *mean* training loss, as every strategy fits it):

    remove:   θ' = θ + (1/n) · P · Σ_{i∈S} ∇ℓ(x_i, y_i; θ)
    relabel:  θ' = θ − (1/n) · P · Σ_{i∈S} (∇ℓ(x_i, y'_i; θ) − ∇ℓ(x_i, y_i; θ))

(one Newton step on the changed objective from the fitted optimum; Koh & Liang 2017).
The per-example gradients of S are summed per tracked layer first and P is applied once
per layer, through the same bound preconditioner that scores test gradients. Only the
tracked layers move; every other parameter stays as it is (:func:`untracked_parameters`).

Away from a convex optimum the step can overshoot: :func:`correct_model` halves it while
the corrected model's loss on the kept / relabelled training set is worse than the
original model's, and reports the scale it kept (0 when no step helped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from influence_cli.engine.batching import model_dtype, prepare_model, test_batches
from influence_cli.engine.capture import LayerBatch
from influence_cli.engine.flat import ParameterLayout
from influence_cli.engine.scoring import gradient_batches
from influence_cli.engine.tracked import to_weight_order
from influence_cli.errors import InfluenceError

__all__ = [
    "ACTIONS",
    "Correction",
    "CorrectionResult",
    "correction_direction",
    "apply_correction",
    "correct_model",
    "mean_loss",
    "untracked_parameters",
]

ACTIONS = ("remove", "relabel")


@dataclass
class Correction:
    """The full step of one correction, per tracked layer in weight column order
    (d_out, d_in), bias folded in as the last column."""

    action: str
    count: int  # |S|
    num_examples: int  # n of the 1/n
    step: dict[str, Tensor]  # ±(1/n) P Σ g
    target_gradients: dict[str, Tensor]  # Σ_S ∇ℓ(x_i, target label): original (remove) or new (relabel)

    def predicted_loss_change(self, scale: float = 1.0) -> float:
        """First-order change of S's summed loss (under its target labels) for the step
        times ``scale``: Σ_S ∇ℓ_iᵀ Δθ."""
        return float(scale) * float(sum((self.target_gradients[k].double() * v.double()).sum() for k, v in self.step.items()))


@dataclass
class CorrectionResult:
    correction: Correction
    scale: float  # the step multiplier kept (1, 1/2, 1/4, ... or 0 when no step helped)
    halvings: int
    objective_before: float
    objective_after: float
    tried: list[tuple[float, float]] = field(default_factory=list)  # (scale, objective)


def mean_loss(model: nn.Module, inputs: Tensor, labels: Tensor, *, batch_size: int = 1024) -> float:
    """Mean cross-entropy of ``model`` on (inputs, labels), in eval mode, no gradients."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in test_batches(inputs, labels, dev, batch_size):
            total += float(F.cross_entropy(model(x), y, reduction="sum"))
            count += len(y)
    model.train(was)
    if count == 0:
        raise InfluenceError("no examples to evaluate the loss on")
    return total / count


def untracked_parameters(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """Names of the model's parameters a correction leaves unchanged."""
    tracked = {id(p) for m in modules.values() for p in (m.weight, getattr(m, "bias", None)) if p is not None}
    return [name for name, p in model.named_parameters() if id(p) not in tracked]


def _summed_gradients(
    model: nn.Module, modules: dict[str, nn.Module], inputs: Tensor, labels: Tensor, dev: torch.device,
    batch_size: int,
) -> tuple[dict[str, Tensor], dict[str, Tensor | None]]:
    """({layer: Σ_i G_i (d_out, d_in), float64, internal column order}, {layer: perm})."""
    sums: dict[str, Tensor] = {}
    perms: dict[str, Tensor | None] = {}
    for _n, layers in gradient_batches(model, modules, test_batches(inputs, labels, dev, batch_size)):
        for name, batch in layers.items():
            a = batch.a.reshape(-1, batch.a.shape[-1]).double()
            g = batch.g.reshape(-1, batch.g.shape[-1]).double()
            part = g.T @ a
            sums[name] = part if name not in sums else sums[name].add_(part)
            perms[name] = batch.perm
    return sums, perms


def _precondition_sums(bound: Any, sums: dict[str, Tensor], perms: dict[str, Tensor | None], dtype: torch.dtype,
                       num_train: int) -> dict[str, Tensor]:
    """P applied once to the summed gradient of every layer → weight order (d_out, d_in).

    The bound preconditioner takes captured (a, g) rows; a matrix G is one "example"
    with d_in positions, a = I and g = Gᵀ (Σ_p g_p a_pᵀ = G), so every strategy —
    block eigenbases, exact, LiSSA or a plug-in — applies its own P, once per layer.
    """
    layers = {}
    for name, total in sums.items():
        d_in = total.shape[1]
        eye = torch.eye(d_in, dtype=dtype, device=total.device)
        layers[name] = LayerBatch(eye[None], total.T.to(dtype)[None].contiguous(), perms[name])
    side = bound.test_side(iter([(1, layers)]), 1, num_train)
    return {name: value[0].double() for name, value in bound.export_side(side).items()}


def correction_direction(
    model: nn.Module,
    factors: Any,
    inputs: Tensor,
    labels: Tensor,
    *,
    action: str,
    num_examples: int,
    new_labels: Tensor | None = None,
    device: torch.device | str | None = None,
    loader: Iterable | None = None,
    batch_size: int = 256,
) -> Correction:
    """The full correction step for the examples S given as (inputs, labels).

    labels: S's current training labels; new_labels: relabel's targets. num_examples: n,
    the training-set size the curvature was averaged over. loader: the training loader,
    for strategies that need it when bound (LiSSA's curvature products).
    """
    if action not in ACTIONS:
        raise InfluenceError(f"action must be one of {ACTIONS}, not {action!r}")
    if len(inputs) == 0:
        raise InfluenceError("the set of examples to correct is empty")
    if num_examples < 1:
        raise InfluenceError(f"num_examples must be positive, not {num_examples}")
    dev = prepare_model(model, device)
    bound = factors.bind(model, dev, loader=loader)
    labels = torch.as_tensor(labels, dtype=torch.long)
    old, perms = _summed_gradients(model, bound.modules, inputs, labels, dev, batch_size)
    if action == "remove":
        direction, target, sign = old, old, 1.0
    else:
        if new_labels is None or len(new_labels) != len(labels):
            raise InfluenceError("relabel needs one new label per example")
        new, _ = _summed_gradients(model, bound.modules, inputs, torch.as_tensor(new_labels, dtype=torch.long), dev,
                                   batch_size)
        direction = {name: new[name] - old[name] for name in new}
        target, sign = new, -1.0
    pre = _precondition_sums(bound, direction, perms, model_dtype(model), num_examples)
    step = {name: (sign / num_examples) * value for name, value in pre.items()}
    target_w = {name: to_weight_order(t, perms[name], 1) for name, t in target.items()}
    if not all(bool(torch.isfinite(v).all()) for v in step.values()):
        raise InfluenceError("the correction step is not finite (check the damping)")
    return Correction(action, int(len(inputs)), int(num_examples), step, target_w)


def apply_correction(model: nn.Module, modules: dict[str, nn.Module], correction: Correction,
                     scale: float = 1.0) -> None:
    """θ ← θ + scale · step on the tracked layers, in place."""
    layout = ParameterLayout(modules)
    flat = layout.flatten({name: correction.step[name][None] for name in layout.slots})
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in layout.to_params(flat[0]).items():
            p = params[name]
            p.add_(delta.to(device=p.device, dtype=p.dtype), alpha=float(scale))


def correct_model(
    model: nn.Module,
    modules: dict[str, nn.Module],
    correction: Correction,
    objective: Callable[[nn.Module], float],
    *,
    max_halvings: int = 4,
) -> CorrectionResult:
    """Apply ``correction`` (from :func:`correction_direction`) to ``model`` in place,
    backtracking on ``objective``.

    objective(model): the loss on the kept (remove) or relabelled (relabel) training set.
    The step is halved while the objective is worse than before, at most ``max_halvings``
    times; if even the smallest step is worse the model is left unchanged (scale 0).
    modules: the tracked {name: module} (``factors.check_model(model)``).
    """
    before = float(objective(model))
    tried: list[tuple[float, float]] = []
    applied = 0.0
    scale = 1.0
    for halving in range(max_halvings + 1):
        apply_correction(model, modules, correction, scale - applied)
        applied = scale
        value = float(objective(model))
        tried.append((scale, value))
        if value <= before:
            return CorrectionResult(correction, scale, halving, before, value, tried)
        scale /= 2
    apply_correction(model, modules, correction, -applied)
    return CorrectionResult(correction, 0.0, max_halvings, before, before, tried)
