"""Flat parameter layout of the tracked layers and curvature-vector products.

The dense and iterative solvers work on one flat vector over every tracked layer, not
per-layer blocks: per layer the weight-order matrix (d_out, d_in) with the bias folded in
as the last column (conv weights as ``weight.reshape(d_out, -1)``), row-major, layers
concatenated in tracked-module order. :class:`ParameterLayout` converts between that
layout, per-layer (T, d_out, d_in) tensors and torch.func parameter dicts.

Curvature of the mean training cross-entropy w.r.t. the tracked parameters (untracked
ones held fixed, model in eval mode):

- ``gauss_newton``: GN = (1/N) Σ_i J_iᵀ H_out,i J_i, H_out = diag(p) − ppᵀ (PSD).
- ``hessian``: the exact Hessian (may be indefinite away from a minimum).
"""

from __future__ import annotations

import warnings

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from influence_cli.errors import InfluenceError
from influence_cli.influence.modules import (
    ActivationCapture,
    LayerBatch,
    _logits,
    layer_kind,
    layer_shape,
    to_weight_order,
)
from influence_cli.influence.precondition import per_example_grads

__all__ = [
    "CURVATURES",
    "LayerSlot",
    "ParameterLayout",
    "CurvatureProducts",
    "flat_gradients",
    "pseudo_gradient_batches",
    "check_curvature",
]

CURVATURES = ("gauss_newton", "hessian")


def check_curvature(curvature: str) -> str:
    if curvature not in CURVATURES:
        raise InfluenceError(f"curvature must be one of {CURVATURES}, not {curvature!r}")
    return curvature


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


@dataclass(frozen=True)
class LayerSlot:
    """Where one tracked layer lives in the flat vector."""

    name: str
    kind: str
    d_out: int
    d_in: int  # includes the folded bias column
    has_bias: bool
    offset: int
    weight_shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return self.d_out * self.d_in

    @property
    def span(self) -> slice:
        return slice(self.offset, self.offset + self.size)


class ParameterLayout:
    """Flat (T, P) ⇄ {layer: (T, d_out, d_in)} ⇄ {"<name>.weight", "<name>.bias"} dicts."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = dict(modules)
        self.slots: dict[str, LayerSlot] = {}
        offset = 0
        for name, module in self.modules.items():
            d_out, d_in, has_bias = layer_shape(module)
            slot = LayerSlot(
                name, layer_kind(module), d_out, d_in, has_bias, offset, tuple(module.weight.shape)
            )
            self.slots[name] = slot
            offset += slot.size
        self.size = offset

    def __len__(self) -> int:
        return self.size

    @property
    def param_names(self) -> list[str]:
        names = []
        for slot in self.slots.values():
            names.append(_prefix(slot.name) + "weight")
            if slot.has_bias:
                names.append(_prefix(slot.name) + "bias")
        return names

    def info(self) -> dict[str, tuple[str, int, int, bool]]:
        """{name: (kind, d_out, d_in, has_bias)} as stored in meta.json."""
        return {s.name: (s.kind, s.d_out, s.d_in, s.has_bias) for s in self.slots.values()}

    def meta(self) -> dict[str, dict[str, object]]:
        return {
            s.name: {"kind": s.kind, "d_out": s.d_out, "d_in": s.d_in, "has_bias": s.has_bias}
            for s in self.slots.values()
        }

    def flatten(self, layers: dict[str, Tensor]) -> Tensor:
        """{layer: (T, d_out, d_in)} in weight column order → (T, P)."""
        parts = [layers[name].reshape(layers[name].shape[0], -1) for name in self.slots]
        return torch.cat(parts, dim=1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """(T, P) → {layer: (T, d_out, d_in)} (views)."""
        if flat.shape[-1] != self.size:
            raise InfluenceError(f"expected vectors of {self.size} parameters, got {flat.shape[-1]}")
        return {
            name: flat[:, s.span].reshape(flat.shape[0], s.d_out, s.d_in) for name, s in self.slots.items()
        }

    def to_params(self, flat: Tensor) -> dict[str, Tensor]:
        """(..., P) → torch.func parameter dict with the same leading dims."""
        lead = flat.shape[:-1]
        out: dict[str, Tensor] = {}
        for s in self.slots.values():
            block = flat[..., s.span].reshape(*lead, s.d_out, s.d_in)
            w_cols = s.d_in - 1 if s.has_bias else s.d_in
            out[_prefix(s.name) + "weight"] = block[..., :w_cols].reshape(*lead, *s.weight_shape)
            if s.has_bias:
                out[_prefix(s.name) + "bias"] = block[..., w_cols]
        return out

    def from_params(self, params: dict[str, Tensor]) -> Tensor:
        """torch.func parameter dict (leading dims ...) → (..., P)."""
        parts = []
        lead: tuple[int, ...] | None = None
        for s in self.slots.values():
            w = params[_prefix(s.name) + "weight"]
            lead = tuple(w.shape[: w.dim() - len(s.weight_shape)])
            w = w.reshape(*lead, s.d_out, -1)
            if s.has_bias:
                w = torch.cat([w, params[_prefix(s.name) + "bias"].unsqueeze(-1)], dim=-1)
            parts.append(w.reshape(*lead, s.size))
        return torch.cat(parts, dim=-1)

    def current(self) -> dict[str, Tensor]:
        """The tracked parameters' current values (detached)."""
        out = {}
        for s in self.slots.values():
            module = self.modules[s.name]
            out[_prefix(s.name) + "weight"] = module.weight.detach()
            if s.has_bias:
                out[_prefix(s.name) + "bias"] = module.bias.detach()
        return out


def flat_gradients(layout: ParameterLayout, layers: dict[str, LayerBatch], dtype: torch.dtype | None = None) -> Tensor:
    """Per-example flat gradients (n, P) from captured (a, g), in weight column order."""
    first = next(iter(layers.values()))
    n = first.n
    dtype = dtype or first.a.dtype
    out = first.a.new_empty(n, layout.size, dtype=dtype)
    for name, slot in layout.slots.items():
        batch = layers[name]
        grads = per_example_grads(batch.a, batch.g)  # internal column order
        grads = to_weight_order(grads, batch.perm, 2)
        out[:, slot.span] = grads.reshape(n, -1)
    return out


def pseudo_gradient_batches(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[tuple[Tensor, Tensor]],
    dtype: torch.dtype = torch.float64,
) -> Iterator[tuple[int, int, dict[str, LayerBatch]]]:
    """(n, C, {layer: LayerBatch of n·C rows}) per batch: GN = (1/N) Σ_rows x xᵀ.

    H_out = diag(p) − ppᵀ = M Mᵀ with M = diag(√p) − p√pᵀ (Σp = 1), so
    J_iᵀ H_out J_i = Σ_c (J_iᵀ m_c)(J_iᵀ m_c)ᵀ. The batch is replicated C times
    (row c·n + i = example i, column c) and one backward pass of Σ_rows z·m gives
    every pseudo-gradient through the ordinary capture machinery. Model must be in
    eval mode (replicas must see identical forward passes).
    """
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        return
    with torch.no_grad():
        classes = int(_logits(model(first[0][:1])).shape[-1])
    capture = ActivationCapture(modules, dtype=dtype)
    with torch.no_grad(), capture:
        for inputs, _labels in itertools.chain([first], iterator):
            n = int(inputs.shape[0])
            rep = inputs.unsqueeze(0).expand(classes, *inputs.shape).reshape(classes * n, *inputs.shape[1:])
            logits = capture.forward(model, rep)
            with torch.enable_grad():
                p = torch.softmax(logits[:n].detach().to(torch.float64), dim=-1)  # (n, C)
                sqrt_p = p.sqrt()
                # m_c[k] = √p_c (δ_ck − p_k): (C, n, C) indexed [c, i, k]
                eye = torch.eye(classes, dtype=p.dtype, device=p.device)
                m = sqrt_p.T[:, :, None] * (eye[:, None, :] - p[None, :, :])
                cot = m.reshape(classes * n, classes).to(logits.dtype)
                loss = (logits * cot).sum()
                layers = capture.gradients(loss)
            yield n, classes, layers


class CurvatureProducts:
    """K·V on one minibatch for a batch of flat vectors V (k, P), via torch.func.

    Returns the SUM over the minibatch's examples (callers divide by the count), so
    products over several batches add up to the full-data curvature.
    """

    def __init__(self, model: nn.Module, layout: ParameterLayout, curvature: str = "gauss_newton"):
        self.model = model
        self.layout = layout
        self.curvature = check_curvature(curvature)
        tracked = set(layout.param_names)
        self.fixed = {k: v.detach() for k, v in model.named_parameters() if k not in tracked}
        self.fixed.update(dict(model.named_buffers()))
        self.tracked = layout.current()

    def _logits(self, params: dict[str, Tensor], inputs: Tensor) -> Tensor:
        return _logits(functional_call(self.model, {**self.fixed, **params}, (inputs,)))

    def product(self, inputs: Tensor, labels: Tensor, vectors: Tensor) -> Tensor:
        """Σ_i K_i V for the examples of one batch; vectors (k, P) → (k, P)."""
        with warnings.catch_warnings():
            # torch's forward-AD decompositions call torch.jit.script on first use, which
            # warns about its own deprecation; not the user's concern.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            return self._product(inputs, labels, vectors)

    def _product(self, inputs: Tensor, labels: Tensor, vectors: Tensor) -> Tensor:
        dtype = next(iter(self.tracked.values())).dtype
        tangents = self.layout.to_params(vectors.to(dtype))
        if self.curvature == "gauss_newton":

            def f(params: dict[str, Tensor]) -> Tensor:
                return self._logits(params, inputs)

            logits, vjp_fn = vjp(f, self.tracked)
            p = torch.softmax(logits.detach(), dim=-1)

            def jv(t: dict[str, Tensor]) -> Tensor:
                return jvp(f, (self.tracked,), (t,))[1]

            u = vmap(jv)(tangents)  # (k, n, C)
            hu = p * u - p * (p * u).sum(-1, keepdim=True)
            out = vmap(vjp_fn)(hu)[0]
        else:

            def loss(params: dict[str, Tensor]) -> Tensor:
                return F.cross_entropy(self._logits(params, inputs), labels, reduction="sum")

            g = grad(loss)

            def hv(t: dict[str, Tensor]) -> Tensor:
                return jvp(g, (self.tracked,), (t,))[1]

            out = vmap(hv)(tangents)
        return self.layout.from_params(out).to(vectors.dtype)
