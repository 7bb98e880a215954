"""Numerical kernels shared by fitting and scoring: reused scratch buffers, the
tall-skinny GEMM, per-example gradients of rank-one and conv layers with the per-side
flop rule, and Gram-matrix accumulation.

Captured data of a tracked layer is a (n, P, d_in) and g (n, P, d_out): P positions per
example (1 for a plain Linear, the spatial positions of a conv). The per-example weight
gradient is G_i = Σ_p g_ip a_ipᵀ (d_out × d_in).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "Workspace",
    "scratch",
    "chunk_size",
    "matmul_t",
    "left_mul",
    "per_example_grads",
    "rotated_per_example_grads",
    "reference_rotated_grads",
    "accumulate_gram",
    "mirror_upper",
    "accumulate_gram_positions",
]

# Per-chunk budget (elements) for per-example gradient tensors built in one go.
_CHUNK_ELEMENTS = 24 * 1024 * 1024
_GRAM_BLOCKS = 3
_GRAM_MIN_DIM = 256


class Workspace:
    """Scratch buffers reused across batches.

    Big temporaries (conv patches, per-example gradients) allocated afresh every batch
    are page-faulted in by the kernel each time, which on the CPU costs as much as the
    arithmetic. Reusing them avoids that. A buffer handed out under a tag is only valid
    until the same tag is requested again.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self.enabled = True  # False: hand out fresh tensors (callers keep them)

    def get(self, tag: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        if not self.enabled:
            self._buffers.clear()
            return like.new_empty(shape)
        numel = 1
        for size in shape:
            numel *= int(size)
        buf = self._buffers.get(tag)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
            self._buffers[tag] = buf
        return buf[:numel].view(shape)


def scratch(ws: Workspace | None, tag: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A buffer from ``ws`` or a fresh tensor when there is no workspace."""
    if ws is None:
        return like.new_empty(shape)
    return ws.get(tag, shape, like)


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


def left_mul(q_t: Tensor, x: Tensor, out: Tensor) -> Tensor:
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
        g_t = left_mul(q_s.T, g_t, scratch(ws, "rot_g", (n, d_out, positions), a))
    grads = torch.bmm(g_t, a, out=scratch(ws, "grads", (n, d_out, d_in), a))
    if q_a is not None and not a_first:
        grads = matmul_t(grads.view(n * d_out, d_in), q_a_t).view(n, d_out, d_in)
    if q_s is not None and not s_first:
        grads = left_mul(q_s.T, grads, scratch(ws, "grads_s", (n, d_out, d_in), a))
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


# ----------------------------------------------------------------- Gram matrices
def accumulate_gram(acc: Tensor, x: Tensor) -> None:
    """acc += xᵀx for a tall (rows, d) matrix, in place (no temporaries).

    For wide matrices only the upper block-triangle is accumulated (⅔ of the flops with
    3 blocks; torch has no syrk); call :func:`mirror_upper` once at the end.
    """
    d = x.shape[1]
    if not _blocked_gram(d):
        acc.addmm_(x.T, x)
        return
    edges = [round(i * d / _GRAM_BLOCKS) for i in range(_GRAM_BLOCKS + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        acc[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:])


def _blocked_gram(d: int) -> bool:
    return d >= _GRAM_MIN_DIM


def mirror_upper(acc: Tensor) -> Tensor:
    """Complete a matrix whose upper block-triangle was accumulated by accumulate_gram."""
    d = acc.shape[0]
    if not _blocked_gram(d):
        return acc
    edges = [round(i * d / _GRAM_BLOCKS) for i in range(_GRAM_BLOCKS + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        acc[hi:, lo:hi] = acc[lo:hi, hi:].T
    return acc


def accumulate_gram_positions(acc: Tensor, g: Tensor, ws: Workspace) -> None:
    """acc += Σ_i Σ_p g_ip g_ipᵀ for g (n, P, d): one GEMM when rows are contiguous, else
    (conv captures, where g is a transposed view) a batched matmul on the natural layout."""
    n, positions, d = g.shape
    if positions == 1 or g.is_contiguous():
        accumulate_gram(acc, g.reshape(-1, d))
        return
    if d > positions:  # per-example d×d products would outgrow g itself: copy rows
        rows = ws.get("gram_rows", (n, positions, d), g)
        rows.copy_(g)
        accumulate_gram(acc, rows.view(-1, d))
        return
    g_t = g.transpose(1, 2)
    per_example = torch.bmm(g_t, g_t.transpose(1, 2), out=ws.get("gram", (n, d, d), g))
    acc.add_(torch.sum(per_example, 0, out=ws.get("gram_sum", (d, d), g)))
