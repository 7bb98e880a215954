"""Strategies over the whole tracked parameter vector (exact, lissa): the flat layout,
flat per-example gradients, their stored form and their scoring.

Per layer the weight-order matrix (d_out, d_in) with the bias folded in as the last
column (conv weights as ``weight.reshape(d_out, -1)``), row-major, layers concatenated
in tracked-module order. :class:`ParameterLayout` converts between that layout,
per-layer (T, d_out, d_in) tensors and torch.func parameter dicts.

A flat solver is any object with ``check_model(model)``, ``precondition_flat(x)`` →
(K + λI)⁻¹ x per row and ``self_scores(x)`` → xᵀ (K + λI)⁻¹ x per row; :class:`FlatBound`
drives it for the scoring loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from influence_cli.engine.batching import model_dtype
from influence_cli.engine.capture import LayerBatch
from influence_cli.engine.kernels import per_example_grads
from influence_cli.engine.storage import FORMAT_VERSION, package_version, read_meta, read_stored
from influence_cli.engine.tracked import layer_kind, layer_shape, to_weight_order
from influence_cli.errors import FactorsError, InfluenceError

__all__ = [
    "DENSE_DAMPING_FACTOR",
    "LayerSlot",
    "ParameterLayout",
    "flat_gradients",
    "FlatBound",
    "solver_meta",
    "layout_meta",
    "read_solver",
    "modules_info",
    "num_params",
]

# damping "auto" = factor × trace(K)/P for the dense Gauss-Newton (exact, and LiSSA, which
# solves the same system). Measured on digits-mlp (LDS against 100 retrainings,
# docs/damping.md): the dense GN peaks near 3, the block approximations near 0.1 — the
# true GN has many near-zero eigenvalues that K-FAC's factorisation does not reproduce.
DENSE_DAMPING_FACTOR = 3.0


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


class FlatBound:
    """A flat solver bound to a model: flat per-example gradients in, scores out."""

    chunk_rows = 512  # self-influence rows gathered for one solver call (LiSSA batches them)

    def __init__(self, solver: Any, model: nn.Module, device: torch.device):
        self.solver = solver
        self.modules = solver.check_model(model)
        self.layout = ParameterLayout(self.modules)
        self.device = device
        self.dtype = model_dtype(model)
        self.row_elements = self.layout.size

    def self_part(self, layers: dict[str, LayerBatch]) -> Tensor:
        return flat_gradients(self.layout, layers, self.dtype)

    def self_scores(self, parts: list[Tensor]) -> Tensor:
        return self.solver.self_scores(torch.cat(parts))

    @property
    def can_whiten(self) -> bool:
        """Whether :meth:`whiten` exists: a Cholesky-factorised solver (exact)."""
        return bool(getattr(self.solver, "can_whiten", False))

    def whiten(self, parts: list[Tensor]) -> Tensor:
        return self.solver.whiten(torch.cat(parts))

    def test_side(
        self, batches: Iterable[tuple[int, dict[str, LayerBatch]]], num_test: int, num_train: int | None
    ) -> Tensor:
        """(K + λI)⁻¹ g_t as flat rows (T, P), weight column order, solved once."""
        parts = [flat_gradients(self.layout, layers, self.dtype) for _n, layers in batches]
        if not parts:
            raise InfluenceError("no test rows to score")
        return self.solver.precondition_flat(torch.cat(parts))

    def side_from_gradients(self, grads: dict[str, Tensor], rows: slice) -> Tensor:
        missing = set(self.modules) - set(grads)
        if missing:
            raise InfluenceError(f"test_gradients lack layers {sorted(missing)}")
        side = self.layout.flatten({name: grads[name][rows] for name in self.modules})
        return side.to(device=self.device, dtype=self.dtype)

    def export_side(self, side: Tensor) -> dict[str, Tensor]:
        return self.layout.unflatten(side)

    def side_rows(self, side: Tensor) -> int:
        return int(side.shape[0])

    def pair_scores(self, side: Tensor, layers: dict[str, LayerBatch]) -> Tensor:
        return side @ flat_gradients(self.layout, layers, self.dtype).T  # (T, n)


# --------------------------------------------------------------- stored form
def solver_meta(strategy: str, layout_meta: dict[str, Any], num_examples: int, damping: float,
                damping_rule: str | float, curvature: str) -> dict[str, Any]:
    """The meta.json keys every flat solver writes."""
    return {
        "format_version": FORMAT_VERSION,
        "strategy": strategy,
        "num_examples": int(num_examples),
        "damping": float(damping),
        "damping_rule": damping_rule,
        "curvature": curvature,
        "package_version": package_version(),
        "modules": layout_meta,
    }


def layout_meta(info: dict[str, tuple[str, int, int, bool]]) -> dict[str, dict[str, Any]]:
    return {name: {"kind": k, "d_out": o, "d_in": i, "has_bias": b} for name, (k, o, i, b) in info.items()}


def read_solver(directory: str | os.PathLike, strategy: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(meta, tensors) of a stored flat solver; FactorsError if another strategy's."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta.get("strategy") != strategy:
        raise FactorsError(
            f"factors at {directory} are {meta.get('strategy')!r}, not {strategy!r}; use load_factors"
        )
    return read_stored(directory)


def modules_info(meta: dict[str, Any]) -> dict[str, tuple[str, int, int, bool]]:
    info = {
        name: (str(m["kind"]), int(m["d_out"]), int(m["d_in"]), bool(m["has_bias"]))
        for name, m in meta["modules"].items()
    }
    if not info:
        raise ValueError("no tracked module")
    return info


def num_params(info: dict[str, tuple[str, int, int, bool]]) -> int:
    return sum(d_out * d_in for _k, d_out, d_in, _b in info.values())
