"""Applying a layer's preconditioner (H + λI)⁻¹ in its eigenbasis, one interface for all.

Every block strategy stores, per layer, an eigenbasis (Q_S, Q_A; None = identity) and
eigenvalues Λ (d_out × d_in), so

    P(G) = Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ.

Identity bases skip their rotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from influence_cli.engine.kernels import Workspace, matmul_t, rotated_per_example_grads

__all__ = ["LayerFactors", "LayerOperator", "operators", "precondition", "precondition_all"]


@dataclass
class LayerFactors:
    """One layer's preconditioner: eigenbases (None = identity), eigenvalues, damping."""

    name: str
    kind: str  # "linear" | "conv2d"
    d_out: int
    d_in: int  # includes the folded bias column
    has_bias: bool
    q_s: Tensor | None  # (d_out, d_out)
    q_a: Tensor | None  # (d_in, d_in)
    eigenvalues: Tensor  # (d_out, d_in)
    damping: float


def _transposed(q: Tensor | None) -> Tensor | None:
    return None if q is None else q.T.contiguous()


class LayerOperator:
    """A layer's factors on the compute device/dtype, with W = 1/(Λ + λ) precomputed."""

    def __init__(
        self,
        layer: LayerFactors,
        device: torch.device | str,
        dtype: torch.dtype,
        perm: Tensor | None = None,
    ):
        """perm: the captured input column order (internal column j = weight column
        perm[j]); the operator then works directly on captured data and on gradients
        whose columns are in that order."""
        self.name = layer.name
        self.kind = layer.kind
        self.d_out = layer.d_out
        self.d_in = layer.d_in
        self.has_bias = layer.has_bias
        self.damping = float(layer.damping)
        self.q_s = None if layer.q_s is None else layer.q_s.to(device=device, dtype=dtype)
        self.q_a = None if layer.q_a is None else layer.q_a.to(device=device, dtype=dtype)
        lam = layer.eigenvalues.to(device=device, dtype=torch.float64)
        self.inverse = (1.0 / (lam + self.damping)).to(dtype)  # W (d_out, d_in)
        self.perm = perm
        if perm is not None:
            perm = perm.to(device)
            if self.q_a is not None:
                self.q_a = self.q_a.index_select(0, perm).contiguous()
            else:  # Λ's columns are weight columns
                self.inverse = self.inverse.index_select(1, perm).contiguous()
        # Transposed copies for x @ Q products through matmul_t.
        self.q_a_t = _transposed(self.q_a)
        self.q_s_t = _transposed(self.q_s)
        self.inverse_t = self.inverse.T.contiguous()

    @property
    def identity_bases(self) -> bool:
        return self.q_s is None and self.q_a is None

    def rotate_vectors(self, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """ã = a Q_A, g̃ = g Q_S for rank-one rows a (n, d_in), g (n, d_out)."""
        a_rot = a if self.q_a is None else matmul_t(a.contiguous(), self.q_a_t)
        g_rot = g if self.q_s is None else matmul_t(g.contiguous(), self.q_s_t)
        return a_rot, g_rot

    def rotated_grads(self, a: Tensor, g: Tensor, ws: Workspace | None = None) -> Tensor:
        """Q_Sᵀ G_i Q_A (n, d_out, d_in) from captured a (n, P, d_in), g (n, P, d_out)."""
        return rotated_per_example_grads(a, g, self.q_a, self.q_s, ws, self.q_a_t)

    def rotate(self, grads: Tensor) -> Tensor:
        """Q_Sᵀ G Q_A for a batch (T, d_out, d_in)."""
        t = grads.shape[0]
        if self.q_a is not None:
            grads = torch.mm(grads.reshape(t * self.d_out, self.d_in), self.q_a).view(
                t, self.d_out, self.d_in
            )
        if self.q_s is not None:
            grads = torch.matmul(self.q_s.T, grads)
        return grads

    def unrotate(self, grads: Tensor) -> Tensor:
        """Q_S G̃ Q_Aᵀ for a batch (T, d_out, d_in)."""
        t = grads.shape[0]
        if self.q_a is not None:
            grads = torch.mm(grads.reshape(t * self.d_out, self.d_in), self.q_a.T).view(
                t, self.d_out, self.d_in
            )
        if self.q_s is not None:
            grads = torch.matmul(self.q_s, grads)
        return grads

    def apply(self, grads: Tensor) -> Tensor:
        """P(G) for a batch of gradient matrices (T, d_out, d_in) → same shape."""
        return self.unrotate(self.rotate(grads) * self.inverse)


def operators(
    factors: Any,
    device: torch.device | str,
    dtype: torch.dtype,
    perms: dict[str, Tensor | None] | None = None,
) -> dict[str, LayerOperator]:
    """One operator per stored layer (in the captured column order when perms given)."""
    perms = perms or {}
    return {
        name: LayerOperator(layer, device, dtype, perms.get(name))
        for name, layer in factors.layers.items()
    }


def precondition(layer: LayerFactors, grads: Tensor) -> Tensor:
    """P(G) = Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ for grads (T, d_out, d_in)."""
    squeeze = grads.dim() == 2
    if squeeze:
        grads = grads.unsqueeze(0)
    out = LayerOperator(layer, grads.device, grads.dtype).apply(grads)
    return out.squeeze(0) if squeeze else out


def precondition_all(factors: Any, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """P applied per layer to {name: (T, d_out, d_in)}."""
    return {name: precondition(factors.layers[name], g) for name, g in grads.items()}
