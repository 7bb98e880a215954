"""Scoring with per-layer factors: the fast paths of the block strategies.

For layers whose per-example gradient is rank one (Linear on non-sequence input) no
G_i is built: a_i and g_i are rotated into the eigenbases once, then self-influence is
Σ_jk g̃_j² ã_k² / (Λ_jk + λ), one matmul per batch, and pairwise scores contract the
test side's preconditioned gradients with (g_i, a_i) directly. Higher-rank layers (conv)
build rotated per-example gradients with the per-side flop rule.

:class:`BlockBound` is what ``Factors.bind`` returns; ``engine.scoring`` drives it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from influence_cli.engine.batching import model_dtype
from influence_cli.engine.capture import LayerBatch
from influence_cli.engine.kernels import Workspace, chunk_size, matmul_t, per_example_grads, rotated_per_example_grads
from influence_cli.engine.lowrank import factored_scores, prefer_factored, truncated_svd
from influence_cli.engine.operators import LayerOperator, operators
from influence_cli.engine.tracked import column_order, to_internal_order, to_weight_order
from influence_cli.errors import InfluenceError

__all__ = ["BlockBound"]

# Elements allowed in one intermediate (n, T, d) tensor of the pairwise contraction.
_PAIR_ELEMENTS = 4 * 1024 * 1024


class BlockBound:
    """Per-layer factors bound to a model: operators on its device, in its dtype and in
    the captured column order."""

    chunk_rows = 0  # self-influence: score every batch as it comes

    def __init__(self, factors: Any, model: nn.Module, device: torch.device):
        self.modules = factors.check_model(model)
        perms = {name: column_order(module) for name, module in self.modules.items()}
        self.device = device
        self.dtype = model_dtype(model)
        self.ops = operators(factors, device, self.dtype, perms)
        self.row_elements = sum(op.d_out * op.d_in for op in self.ops.values())
        self._ws = Workspace()
        self._ws_alt = Workspace()  # the second rotated gradient of self_terms

    # ----------------------------------------------------------- self-influence
    def self_part(self, layers: dict[str, LayerBatch]) -> Tensor:
        """g_iᵀ P g_i summed over layers for one batch → (n,)."""
        total = None
        for name, batch in layers.items():
            part = _self_scores(self.ops[name], batch, self._ws)
            total = part if total is None else total.add_(part)
        return total

    def self_scores(self, parts: list[Tensor]) -> Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def self_terms(
        self, layers: dict[str, LayerBatch], alternative: dict[str, LayerBatch]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(gᵀPg, g'ᵀPg', (g' − g)ᵀP(g' − g)) summed over layers for one batch, from the
        captures of two objectives of the same forward pass (``engine.mislabel``)."""
        totals: list[Tensor] | None = None
        for name, batch in layers.items():
            parts = _self_terms(self.ops[name], batch, alternative[name], self._ws, self._ws_alt)
            totals = list(parts) if totals is None else [t.add_(p) for t, p in zip(totals, parts)]
        assert totals is not None
        return totals[0], totals[1], totals[2]

    # ----------------------------------------------------------------- pairwise
    def test_side(
        self, batches: Iterable[tuple[int, dict[str, LayerBatch]]], num_test: int, num_train: int | None
    ) -> dict[str, "_TestSide"]:
        """Precondition the test gradients once, per layer in the cheaper basis."""
        parts: dict[str, list[Tensor]] = {name: [] for name in self.ops}
        rotated: dict[str, bool] = {}
        for _n, layers in batches:
            for name, batch in layers.items():
                op = self.ops[name]
                if name not in rotated:
                    rotated[name] = _prefer_eigenbasis(op, num_test, batch.positions, num_train)
                if rotated[name]:
                    if batch.positions == 1:
                        a_rot, g_rot = op.rotate_vectors(batch.a[:, 0], batch.g[:, 0])
                        m = g_rot[:, :, None] * a_rot[:, None, :]
                    else:
                        m = op.rotated_grads(batch.a, batch.g)
                    parts[name].append(m.mul_(op.inverse))
                else:
                    parts[name].append(op.apply(per_example_grads(batch.a, batch.g)))
        return {name: _TestSide(torch.cat(p), rotated[name]) for name, p in parts.items()}

    def side_from_gradients(self, grads: dict[str, Tensor], rows: slice) -> dict[str, "_TestSide"]:
        """The test side from :meth:`export_side`'s form (weight order, original basis)."""
        missing = set(self.ops) - set(grads)
        if missing:
            raise InfluenceError(f"test_gradients lack layers {sorted(missing)}")
        return {
            name: _TestSide(
                to_internal_order(grads[name][rows].to(device=self.device, dtype=self.dtype), op.perm, 2), False
            )
            for name, op in self.ops.items()
        }

    def export_side(self, side: dict[str, "_TestSide"]) -> dict[str, Tensor]:
        """{layer: (T, d_out, d_in)} in weight column order and the original basis."""
        return {name: to_weight_order(s.matrix, self.ops[name].perm, 2) for name, s in side.items()}

    def side_rows(self, side: dict[str, "_TestSide"]) -> int:
        return next(iter(side.values())).num_test

    def low_rank_side(self, side: dict[str, "_TestSide"], k: int) -> dict[str, "_TestSide"]:
        """Every layer's M_t replaced by its rank-k approximation (``engine.lowrank``): the
        dense M_t,k in the side's basis and its factors in the captured (original) basis."""
        out = {}
        for name, s in side.items():
            op = self.ops[name]
            if k >= min(op.d_out, op.d_in):
                out[name] = s
                continue
            u, sv = truncated_svd(s.matrix, k)
            side_factors = (u, sv)
            if s.rotated:  # factors back to the original basis: U = Q_S Ũ, VS = Q_A ṼS
                u = u if op.q_s is None else torch.matmul(op.q_s, u)
                sv = sv if op.q_a is None else torch.matmul(op.q_a, sv)
            t = u.shape[0]
            out[name] = _TestSide(
                None, s.rotated, rank=k, _side_factors=side_factors,
                u_rows=u.transpose(1, 2).reshape(t * k, op.d_out).contiguous(),
                sv_rows=sv.transpose(1, 2).reshape(t * k, op.d_in).contiguous(),
            )
        return out

    def pair_scores(self, side: dict[str, "_TestSide"], layers: dict[str, LayerBatch]) -> Tensor:
        """score(t, i) for the test side against one training batch → (T, n)."""
        total = None
        for name, batch in layers.items():
            part = _pair_scores(self.ops[name], side[name], batch, self._ws)
            total = part if total is None else total.add_(part)
        return total.T


def _self_scores(op: LayerOperator, batch: LayerBatch, ws: Workspace) -> Tensor:
    """g_iᵀ P g_i of one layer for every example of a batch → (n,)."""
    a, g = batch.a, batch.g
    w = op.inverse
    if batch.positions == 1:
        a_rot, g_rot = op.rotate_vectors(a[:, 0], g[:, 0])
        # In place only on fresh rotated tensors, never on the captured data.
        a_sq = a_rot.square() if op.q_a is None else a_rot.square_()
        g_sq = g_rot.square() if op.q_s is None else g_rot.square_()
        return _rank_one_forms(op, a_sq, [g_sq])[0]
    n = batch.n
    out = a.new_empty(n)
    step = chunk_size(op.d_out * op.d_in * 2)
    w_flat = w.reshape(-1)
    for start in range(0, n, step):
        rotated = op.rotated_grads(a[start : start + step], g[start : start + step], ws)
        out[start : start + step] = torch.mv(rotated.square_().reshape(rotated.shape[0], -1), w_flat)
    return out


def _rank_one_forms(op: LayerOperator, a_sq: Tensor, g_sqs: list[Tensor]) -> list[Tensor]:
    """Σ_jk g̃_j² W_jk ã_k² for each g̃² of ``g_sqs`` (same ã): a matmul over the larger
    side (shared when it is the A side), a rowwise dot over the smaller."""
    if op.d_out <= op.d_in:
        aw = matmul_t(a_sq, op.inverse)
        return [(aw * g_sq).sum(1) for g_sq in g_sqs]
    return [(matmul_t(g_sq, op.inverse_t) * a_sq).sum(1) for g_sq in g_sqs]


def _self_terms(
    op: LayerOperator, batch: LayerBatch, alternative: LayerBatch, ws: Workspace, ws_alt: Workspace
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's gᵀPg, g'ᵀPg' and (g' − g)ᵀP(g' − g) for a batch → three (n,).

    ``alternative`` holds g' for the same activations a. A per-example gradient is linear in
    the output gradient, G(g') − G(g) = G(g' − g), so the third form needs neither its own
    backward pass nor its own rotation: two rotated gradients give all three.
    """
    a, g, g_alt = batch.a, batch.g, alternative.g
    if batch.positions == 1:
        a_rot, g_rot = op.rotate_vectors(a[:, 0], g[:, 0])
        alt_rot = g_alt[:, 0] if op.q_s is None else matmul_t(g_alt[:, 0].contiguous(), op.q_s_t)
        diff = alt_rot - g_rot
        forms = _rank_one_forms(op, a_rot.square(), [g_rot.square(), alt_rot.square(), diff.square_()])
        return forms[0], forms[1], forms[2]
    n = batch.n
    out = (a.new_empty(n), a.new_empty(n), a.new_empty(n))
    step = chunk_size(op.d_out * op.d_in * 4)
    w_flat = op.inverse.reshape(-1)
    positions, d_in = a.shape[1], a.shape[2]
    # Where the A side is rotated per position (P < d_out, the flop rule of
    # kernels.rotated_per_example_grads) both gradients share that rotation: do it once.
    shared_a = op.q_a is not None and positions < op.d_out
    q_a, q_a_t = (None, None) if shared_a else (op.q_a, op.q_a_t)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        a_rows = a[rows]
        if shared_a:
            a_rows = matmul_t(a_rows.reshape(-1, d_in), op.q_a_t).view(a_rows.shape[0], positions, d_in)
        rotated = rotated_per_example_grads(a_rows, g[rows], q_a, op.q_s, ws, q_a_t)
        rotated_alt = rotated_per_example_grads(a_rows, g_alt[rows], q_a, op.q_s, ws_alt, q_a_t)
        k = rotated.shape[0]
        diff = rotated_alt - rotated
        for target, tensor in zip(out, (rotated, rotated_alt, diff)):
            target[rows] = torch.mv(tensor.square_().reshape(k, -1), w_flat)
    return out


@dataclass
class _TestSide:
    """A layer's preconditioned test gradients M (T, d_out, d_in).

    rotated: M lives in the eigenbasis (Q_Sᵀ P(G_t) Q_A), so the training side must be
    rotated to match; otherwise M = P(G_t) in the original basis.
    """

    _matrix: Tensor | None
    rotated: bool
    _transposed: Tensor | None = None
    rank: int = 0  # > 0: matrix is rank-k, with factors u_rows, sv_rows (engine.lowrank)
    u_rows: Tensor | None = None  # (T·k, d_out), original basis
    sv_rows: Tensor | None = None  # (T·k, d_in), original basis
    # rank-k only: (U, VS) in the side's basis; the dense M_t,k = U (VS)ᵀ is built from them
    # on first use, i.e. only if some batch takes the dense contraction (T·d_out·d_in memory)
    _side_factors: tuple[Tensor, Tensor] | None = None

    @property
    def matrix(self) -> Tensor:
        if self._matrix is None:
            u, sv = self._side_factors
            self._matrix = torch.bmm(u, sv.transpose(1, 2))
        return self._matrix

    @property
    def num_test(self) -> int:
        return int((self._matrix if self._matrix is not None else self._side_factors[0]).shape[0])

    def transposed_rows(self) -> Tensor:
        """M with (d_out, d_in) swapped, contiguous, as (T·d_in, d_out); built once."""
        if self._transposed is None:
            t, d_out, d_in = self.matrix.shape
            self._transposed = self.matrix.transpose(1, 2).reshape(t * d_in, d_out)
        return self._transposed


def _prefer_eigenbasis(op: LayerOperator, num_test: int, positions: int, num_train: int | None) -> bool:
    """Rotate the training side into the eigenbasis iff that costs fewer flops than
    rotating the T preconditioned test gradients back (per layer)."""
    if op.identity_bases or num_train is None:
        return False
    d_out, d_in = op.d_out, op.d_in
    back = num_test * d_out * d_in * (d_out + d_in)
    cost_a = 0 if op.q_a is None else (d_in * d_in if positions == 1 else min(positions, d_out) * d_in * d_in)
    cost_s = 0 if op.q_s is None else (d_out * d_out if positions == 1 else min(positions, d_in) * d_out * d_out)
    return num_train * (cost_a + cost_s) < back


def _pair_scores(op: LayerOperator, side: _TestSide, batch: LayerBatch, ws: Workspace) -> Tensor:
    """Σ_jk M_tjk G_ijk for one layer → (n, T), without building G_i when rank one."""
    num_test = side.num_test
    a, g = batch.a, batch.g
    n = batch.n
    if side.rank and prefer_factored(op.d_out, op.d_in, batch.positions, side.rank, num_test):
        return factored_scores(side.u_rows, side.sv_rows, side.rank, a, g)
    m = side.matrix
    if batch.positions == 1:
        a2, g2 = a[:, 0], g[:, 0]
        if side.rotated:
            a2, g2 = op.rotate_vectors(a2, g2)
        out = a.new_empty(n, num_test)
        # Contract the larger side with one GEMM per chunk of test rows (chunks keep the
        # (n, t, d) intermediate cache-sized), then a batched dot over the smaller side.
        if op.d_out <= op.d_in:
            big, small, d_small = a2, g2, op.d_out
        else:
            big, small, d_small = g2, a2, op.d_in
        step = max(1, _PAIR_ELEMENTS // max(1, n * d_small))
        for t0 in range(0, num_test, step):
            t1 = min(num_test, t0 + step)
            if op.d_out <= op.d_in:
                rows = m[t0:t1].reshape(-1, op.d_in)  # (t·d_out, d_in)
            else:
                rows = side.transposed_rows()[t0 * op.d_in : t1 * op.d_in]  # (t·d_in, d_out)
            x = matmul_t(big.contiguous(), rows)  # (n, t·d_small)
            torch.bmm(
                x.view(n, t1 - t0, d_small),
                small.unsqueeze(2),
                out=ws.get("pair_out", (n, t1 - t0, 1), a),
            )
            out[:, t0:t1] = ws.get("pair_out", (n, t1 - t0, 1), a).squeeze(2)
        return out
    out = a.new_empty(n, num_test)
    m_flat = m.reshape(num_test, -1)
    step = chunk_size(op.d_out * op.d_in)
    for start in range(0, n, step):
        sl = slice(start, start + step)
        grads = op.rotated_grads(a[sl], g[sl], ws) if side.rotated else per_example_grads(a[sl], g[sl], ws)
        out[sl] = matmul_t(grads.reshape(grads.shape[0], -1), m_flat)
    return out
