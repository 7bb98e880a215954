"""Fitted per-layer factors (ekfac, kfac, diagonal, identity and any BlockStrategy).

Every block strategy yields, per tracked layer, an eigenbasis (Q_S, Q_A; None =
identity) and eigenvalues Λ (d_out × d_in), so one preconditioner formula serves all:

    P(G) = Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from influence_cli.engine.block_scores import BlockBound
from influence_cli.engine.operators import LayerFactors
from influence_cli.engine.storage import (
    FORMAT_VERSION,
    atomic_save,
    inconsistent_factors,
    merge_extra_meta,
    package_version,
    read_meta,
    read_stored,
)
from influence_cli.engine.tracked import check_tracked
from influence_cli.errors import FactorsError

__all__ = ["LayerFactors", "Factors", "dense_preconditioner"]


def _key(name: str, what: str) -> str:
    return f"{name}::{what}"


@dataclass
class Factors:
    """Fitted factors of every tracked layer, plus how they were fitted."""

    strategy: str
    damping_rule: str | float
    fisher: str
    num_examples: int
    layers: dict[str, LayerFactors]
    meta: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- storage
    def save(self, directory: str | os.PathLike, extra_meta: dict[str, Any] | None = None) -> Path:
        """Write ``factors.safetensors`` then ``meta.json`` atomically into ``directory``.

        Files go to a temporary sibling directory that is renamed into place, so an
        interrupted run never leaves a directory that a later run would trust.
        """
        target = Path(directory)
        meta = merge_extra_meta(self._meta_dict(), extra_meta)
        tensors: dict[str, Tensor] = {}
        for name, layer in self.layers.items():
            tensors[_key(name, "eigenvalues")] = layer.eigenvalues.detach().cpu().contiguous()
            if layer.q_s is not None:
                tensors[_key(name, "q_s")] = layer.q_s.detach().cpu().contiguous()
            if layer.q_a is not None:
                tensors[_key(name, "q_a")] = layer.q_a.detach().cpu().contiguous()
        atomic_save(target, tensors, meta)
        self.meta = meta
        return target

    def _meta_dict(self) -> dict[str, Any]:
        dtypes = {str(layer.eigenvalues.dtype).replace("torch.", "") for layer in self.layers.values()}
        return {
            "format_version": FORMAT_VERSION,
            "strategy": self.strategy,
            "damping_rule": self.damping_rule,
            "fisher": self.fisher,
            "num_examples": int(self.num_examples),
            "package_version": package_version(),
            "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
            "modules": {
                name: {
                    "kind": layer.kind,
                    "d_out": layer.d_out,
                    "d_in": layer.d_in,
                    "has_bias": layer.has_bias,
                    "damping": float(layer.damping),
                    "q_s": layer.q_s is not None,
                    "q_a": layer.q_a is not None,
                }
                for name, layer in self.layers.items()
            },
        }

    @staticmethod
    def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
        """The parsed ``meta.json`` of a factors directory (FactorsError if absent/corrupt)."""
        return read_meta(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Factors":
        """Load factors saved by :meth:`save`; FactorsError with one line if unusable."""
        directory = Path(directory)
        meta, tensors = read_stored(directory)
        try:
            layers: dict[str, LayerFactors] = {}
            for name, info in meta["modules"].items():
                d_out, d_in = int(info["d_out"]), int(info["d_in"])
                eig = tensors[_key(name, "eigenvalues")]
                q_s = tensors[_key(name, "q_s")] if info["q_s"] else None
                q_a = tensors[_key(name, "q_a")] if info["q_a"] else None
                if tuple(eig.shape) != (d_out, d_in):
                    raise ValueError(f"eigenvalues of {name!r} have shape {tuple(eig.shape)}")
                if q_s is not None and tuple(q_s.shape) != (d_out, d_out):
                    raise ValueError(f"q_s of {name!r} has shape {tuple(q_s.shape)}")
                if q_a is not None and tuple(q_a.shape) != (d_in, d_in):
                    raise ValueError(f"q_a of {name!r} has shape {tuple(q_a.shape)}")
                layers[name] = LayerFactors(
                    name=name,
                    kind=str(info["kind"]),
                    d_out=d_out,
                    d_in=d_in,
                    has_bias=bool(info["has_bias"]),
                    q_s=q_s,
                    q_a=q_a,
                    eigenvalues=eig,
                    damping=float(info["damping"]),
                )
            factors = cls(
                strategy=str(meta["strategy"]),
                damping_rule=meta["damping_rule"],
                fisher=str(meta["fisher"]),
                num_examples=int(meta["num_examples"]),
                layers=layers,
                meta=meta,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise inconsistent_factors(directory, exc) from None
        if not layers:
            raise FactorsError(f"factors at {directory} track no module; re-run fit-factors")
        return factors

    def check_model(self, model: nn.Module) -> dict[str, nn.Module]:
        """The model's modules matching the stored layers; FactorsError on any mismatch."""
        return check_tracked(
            model,
            {name: (layer.kind, layer.d_out, layer.d_in, layer.has_bias) for name, layer in self.layers.items()},
        )


    def bind(
        self, model: nn.Module, device: torch.device, *, loader: Any = None, on_batch: Any = None
    ) -> BlockBound:
        """These factors on ``model``'s device and dtype, ready for the scoring loop."""
        return BlockBound(self, model, device)


def dense_preconditioner(layer: LayerFactors) -> Tensor:
    """Reference (Q_S ⊗ Q_A) diag(vec(Λ) + λ)⁻¹ (Q_S ⊗ Q_A)ᵀ, row-major vec, float64.

    Size (d_out·d_in)²: only for tiny layers in tests.
    """
    q_s = torch.eye(layer.d_out, dtype=torch.float64) if layer.q_s is None else layer.q_s.double().cpu()
    q_a = torch.eye(layer.d_in, dtype=torch.float64) if layer.q_a is None else layer.q_a.double().cpu()
    basis = torch.kron(q_s, q_a)
    inv = 1.0 / (layer.eigenvalues.double().cpu().reshape(-1) + layer.damping)
    return (basis * inv) @ basis.T
