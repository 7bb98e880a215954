"""Applying a layer's preconditioner (H + λI)⁻¹ in its eigenbasis, one interface for all.

Every strategy stores, per layer, an eigenbasis (Q_S, Q_A; None = identity) and
eigenvalues Λ (d_out × d_in), so

    P(G) = Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ.

Identity bases skip their rotation. The kernels here also turn captured (a, g) into
rotated per-example gradients cheaply; fitting and scoring share them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from influence_cli.influence.modules import Workspace, scratch

if TYPE_CHECKING:  # pragma: no cover
    from influence_cli.influence.factors import Factors, LayerFactors

__all__ = [
    "LayerOperator",
    "operators",
    "precondition",
    "precondition_all",
    "per_example_grads",
    "rotated_per_example_grads",
    "reference_rotated_grads",
    "chunk_size",
    "matmul_t",
]

# Per-chunk budget (elements) for per-example gradient tensors built in one go.
_CHUNK_ELEMENTS = 24 * 1024 * 1024


def chunk_size(per_example: int, budget: int = _CHUNK_ELEMENTS) -> int:
    """How many examples fit the budget when each needs ``per_example`` elements."""
    return max(1, budget // max(1, per_example))


_ONEDNN_LINEAR = [torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")]


def matmul_t(x: Tensor, w: Tensor) -> Tensor:
    """x @ wᵀ for a 2-D x (rows, k) and w (n, k).

    On the CPU, oneDNN's linear kernel runs the tall-skinny products of this engine up
    to twice as fast as torch.mm (MKL) at low core counts, so it is used for contiguous
    float32 operands when available; anything else goes to torch.mm.
    """
    if (
        _ONEDNN_LINEAR[0]
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.dim() == 2
        and x.shape[0] >= 64
        and x.is_contiguous()
        and w.is_contiguous()
    ):
        try:
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        except (RuntimeError, NotImplementedError, TypeError):  # pragma: no cover
            _ONEDNN_LINEAR[0] = False
    return torch.mm(x, w.T)


def _transposed(q: Tensor | None) -> Tensor | None:
    return None if q is None else q.T.contiguous()


def _left_mul(q_t: Tensor, x: Tensor, out: Tensor) -> Tensor:
    """q_t @ x[i] for every i of a (n, r, c) batch, as one batched matmul into ``out``."""
    return torch.bmm(q_t.expand(x.shape[0], *q_t.shape), x, out=out)


def per_example_grads(a: Tensor, g: Tensor, ws: Workspace | None = None) -> Tensor:
    """G_i = Σ_p g_ip a_ipᵀ for a (n, P, d_in), g (n, P, d_out) → (n, d_out, d_in)."""
    n, d_in, d_out = a.shape[0], a.shape[2], g.shape[2]
    return torch.bmm(g.transpose(1, 2), a, out=scratch(ws, "grads", (n, d_out, d_in), a))


def rotated_per_example_grads(
    a: Tensor,
    g: Tensor,
    q_a: Tensor | None,
    q_s: Tensor | None,
    ws: Workspace | None = None,
    q_a_t: Tensor | None = None,
) -> Tensor:
    """Q_Sᵀ G_i Q_A for every example, rotating each side where it costs fewer flops.

    Rotating the A side per position costs P·d_in², after contraction d_out·d_in², so it
    rotates per position iff P < d_out; likewise the S side iff P < d_in. The contraction
    Σ_p g_p a_pᵀ is one batched matmul. ``ws`` reuses the big temporaries across calls
    (the result may then live in the workspace). ``q_a_t``: Q_Aᵀ contiguous, if at hand.
    """
    n, positions, d_in = a.shape
    d_out = g.shape[2]
    a_first = q_a is not None and positions < d_out
    s_first = q_s is not None and positions < d_in
    if q_a is not None and q_a_t is None:
        q_a_t = q_a.T.contiguous()
    if a_first:
        a = matmul_t(a.reshape(n * positions, d_in), q_a_t).view(n, positions, d_in)
    g_t = g.transpose(1, 2)  # (n, d_out, P); contiguous for conv captures
    if s_first:
        g_t = _left_mul(q_s.T, g_t, scratch(ws, "rot_g", (n, d_out, positions), a))
    grads = torch.bmm(g_t, a, out=scratch(ws, "grads", (n, d_out, d_in), a))
    if q_a is not None and not a_first:
        grads = matmul_t(grads.view(n * d_out, d_in), q_a_t).view(n, d_out, d_in)
    if q_s is not None and not s_first:
        grads = _left_mul(q_s.T, grads, scratch(ws, "grads_s", (n, d_out, d_in), a))
    return grads


def reference_rotated_grads(
    a: Tensor, g: Tensor, q_a: Tensor | None, q_s: Tensor | None
) -> Tensor:
    """Slow reference: build every G_i explicitly, then Q_Sᵀ G_i Q_A."""
    grads = torch.einsum("npo,npi->noi", g, a)
    if q_a is not None:
        grads = grads @ q_a
    if q_s is not None:
        grads = q_s.T @ grads
    return grads


class LayerOperator:
    """A layer's factors on the compute device/dtype, with W = 1/(Λ + λ) precomputed."""

    def __init__(
        self,
        layer: "LayerFactors",
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
    factors: "Factors",
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


def precondition(layer: "LayerFactors", grads: Tensor) -> Tensor:
    """P(G) = Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ for grads (T, d_out, d_in)."""
    squeeze = grads.dim() == 2
    if squeeze:
        grads = grads.unsqueeze(0)
    out = LayerOperator(layer, grads.device, grads.dtype).apply(grads)
    return out.squeeze(0) if squeeze else out


def precondition_all(factors: "Factors", grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """P applied per layer to {name: (T, d_out, d_in)}."""
    return {name: precondition(factors.layers[name], g) for name, g in grads.items()}
