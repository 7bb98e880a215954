"""Self-influence and pairwise influence scores from fitted factors.

Signs: score(t, i) = g_tᵀ (H + λI)⁻¹ g_i. Positive ⇒ training example i is a proponent
of test example t (up-weighting it lowers the test loss / raises the margin); negative ⇒
opponent. Self-influence(i) = g_iᵀ (H + λI)⁻¹ g_i ≥ 0. Scores are raw inner products;
their scale depends on the model. Training gradients always use the given labels.

Speed comes from never building per-example gradients of rank-one layers: rotate a_i
and g_i into the eigenbases once, then each batch is a single matmul per layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from influence_cli.errors import InfluenceError
from influence_cli.influence.factors import (
    Factors,
    ProgressCallback,
    autocast,
    iterate_batches,
    model_dtype,
    resolve_device,
)
from influence_cli.influence.modules import (
    ActivationCapture,
    LayerBatch,
    Workspace,
    column_order,
    eval_mode,
    to_internal_order,
    to_weight_order,
)
from influence_cli.influence.precondition import (
    LayerOperator,
    chunk_size,
    matmul_t,
    operators,
    per_example_grads,
)

__all__ = [
    "self_influence",
    "pairwise_scores",
    "preconditioned_test_gradients",
    "TopInfluences",
    "measurement_loss",
    "MEASUREMENTS",
]

MEASUREMENTS = ("loss", "margin")
# Elements allowed in one intermediate (n, T, d) tensor of the pairwise contraction.
_PAIR_ELEMENTS = 4 * 1024 * 1024


def measurement_loss(logits: Tensor, labels: Tensor, measurement: str = "loss") -> Tensor:
    """Summed per-example objective whose gradient is the test-side g.

    "loss": cross-entropy. "margin": −(logit_y − logsumexp(other logits)), so a positive
    score still means "proponent" (up-weighting the training example raises the margin).
    """
    if measurement == "loss":
        return F.cross_entropy(logits, labels, reduction="sum")
    if measurement == "margin":
        correct = logits.gather(1, labels[:, None]).squeeze(1)
        is_label = torch.arange(logits.shape[1], device=logits.device) == labels[:, None]
        others = logits.masked_fill(is_label, float("-inf"))
        return -(correct - torch.logsumexp(others, dim=1)).sum()
    raise InfluenceError(f"measurement must be one of {MEASUREMENTS}, not {measurement!r}")


def _setup(
    model: nn.Module, factors: Factors, device: torch.device | str | None
) -> tuple[torch.device, dict[str, nn.Module], dict[str, LayerOperator]]:
    dev = resolve_device(model, device)
    if any(p.device != dev for p in model.parameters()):
        model.to(dev)
    modules = factors.check_model(model)
    perms = {name: column_order(module) for name, module in modules.items()}
    ops = operators(factors, dev, model_dtype(model), perms)
    return dev, modules, ops


def _captured(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[tuple[Tensor, Tensor]],
    measurement: str,
    stage: str,
    on_batch: ProgressCallback | None,
    amp: str | None = None,
):
    """Yield (n, {layer: LayerBatch}) for each batch with the given labels.

    amp autocasts only the model's forward/backward; captured (a, g) come back float32."""
    capture = ActivationCapture(modules, workspace=Workspace())
    with torch.no_grad(), eval_mode(model), capture:
        for inputs, labels in batches:
            with autocast(inputs.device, amp):
                logits = capture.forward(model, inputs)
            with torch.enable_grad(), autocast(inputs.device, amp):
                loss = measurement_loss(logits, labels, measurement)
                layers = capture.gradients(loss)
            del logits, loss
            n = int(labels.shape[0])
            yield n, layers
            if on_batch is not None:
                on_batch(stage, n)


def _self_scores(op: LayerOperator, batch: LayerBatch, ws: Workspace) -> Tensor:
    """g_iᵀ P g_i of one layer for every example of a batch → (n,)."""
    a, g = batch.a, batch.g
    w = op.inverse
    if batch.positions == 1:
        a_rot, g_rot = op.rotate_vectors(a[:, 0], g[:, 0])
        # In place only on fresh rotated tensors, never on the captured data.
        a_sq = a_rot.square() if op.q_a is None else a_rot.square_()
        g_sq = g_rot.square() if op.q_s is None else g_rot.square_()
        # Σ_jk g̃_j² W_jk ã_k²: matmul over the larger side, rowwise dot over the smaller.
        if op.d_out <= op.d_in:
            return (matmul_t(a_sq, w) * g_sq).sum(1)
        return (matmul_t(g_sq, op.inverse_t) * a_sq).sum(1)
    n = batch.n
    out = a.new_empty(n)
    step = chunk_size(op.d_out * op.d_in * 2)
    w_flat = w.reshape(-1)
    for start in range(0, n, step):
        rotated = op.rotated_grads(a[start : start + step], g[start : start + step], ws)
        out[start : start + step] = torch.mv(rotated.square_().reshape(rotated.shape[0], -1), w_flat)
    return out


def self_influence(
    model: nn.Module,
    factors: Factors,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    on_batch: ProgressCallback | None = None,
    amp: str | None = None,
) -> Tensor:
    """s_i = Σ_layers g_iᵀ (H + λI)⁻¹ g_i for every example, in loader order → (N,).

    Uses the given labels. on_batch("self-influence", n) after each batch. amp:
    "bfloat16"/"float16" autocast for the model's forward/backward only. ``factors``
    may also be an ExactSolver / LissaSolver (see ``solvers``).
    """
    if not isinstance(factors, Factors):
        return _solver_self_influence(model, factors, loader, device, on_batch)
    dev, modules, ops = _setup(model, factors, device)
    results: list[Tensor] = []
    ws = Workspace()
    for n, layers in _captured(
        model, modules, iterate_batches(loader, dev), "loss", "self-influence", on_batch, amp
    ):
        total = None
        for name, batch in layers.items():
            part = _self_scores(ops[name], batch, ws)
            total = part if total is None else total.add_(part)
        results.append(total.cpu())
    return _finite_self_scores(results)


def _finite_self_scores(results: list[Tensor]) -> Tensor:
    """The concatenated per-batch self-influence, refused when empty or non-finite."""
    if not results:
        raise InfluenceError("the data loader yielded no examples")
    scores = torch.cat(results)
    if not bool(torch.isfinite(scores).all()):
        raise InfluenceError("self-influence produced non-finite values (check the damping and inputs)")
    return scores


# ===================================================================== pairwise
@dataclass
class TopInfluences:
    """Per test row: the k largest scores (proponents, descending) and the k smallest
    (opponents, ascending: most negative first), with global training indices.

    The smallest scores can still be positive when no training example opposes the
    test prediction; callers decide the role from the sign.
    """

    proponent_scores: Tensor  # (T, k)
    proponent_indices: Tensor  # (T, k) int64
    opponent_scores: Tensor  # (T, k)
    opponent_indices: Tensor  # (T, k) int64


@dataclass
class _TestSide:
    """A layer's preconditioned test gradients M (T, d_out, d_in).

    rotated: M lives in the eigenbasis (Q_Sᵀ P(G_t) Q_A), so the training side must be
    rotated to match; otherwise M = P(G_t) in the original basis.
    """

    matrix: Tensor
    rotated: bool
    _transposed: Tensor | None = None

    def transposed_rows(self) -> Tensor:
        """M with (d_out, d_in) swapped, contiguous, as (T·d_in, d_out); built once."""
        if self._transposed is None:
            t, d_out, d_in = self.matrix.shape
            self._transposed = self.matrix.transpose(1, 2).reshape(t * d_in, d_out)
        return self._transposed


def _test_batches(
    inputs: Tensor, labels: Tensor, device: torch.device, batch_size: int
) -> Iterable[tuple[Tensor, Tensor]]:
    labels = torch.as_tensor(labels)
    if len(inputs) != len(labels):
        raise InfluenceError(f"{len(inputs)} test inputs but {len(labels)} test labels")
    for start in range(0, len(inputs), batch_size):
        yield (
            inputs[start : start + batch_size].to(device),
            labels[start : start + batch_size].to(device=device, dtype=torch.long),
        )


def _dataset_size(loader: Iterable) -> int | None:
    """Approximate number of training examples (only steers a flop-count choice)."""
    count = getattr(loader, "num_examples", None)
    if isinstance(count, int):
        return count
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        try:
            return len(dataset)
        except TypeError:
            return None
    return None


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


def _test_side(
    model: nn.Module,
    modules: dict[str, nn.Module],
    ops: dict[str, LayerOperator],
    test_inputs: Tensor,
    test_labels: Tensor,
    measurement: str,
    device: torch.device,
    batch_size: int,
    num_train: int | None,
    on_batch: ProgressCallback | None,
    amp: str | None = None,
) -> dict[str, _TestSide]:
    """Precondition the test gradients once, per layer in the cheaper basis."""
    num_test = len(test_inputs)
    parts: dict[str, list[Tensor]] = {name: [] for name in ops}
    rotated: dict[str, bool] = {}
    for _n, layers in _captured(
        model,
        modules,
        _test_batches(test_inputs, test_labels, device, batch_size),
        measurement,
        "test-gradients",
        on_batch,
        amp,
    ):
        for name, batch in layers.items():
            op = ops[name]
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


def preconditioned_test_gradients(
    model: nn.Module,
    factors: Factors,
    test_inputs: Tensor,
    test_labels: Tensor,
    *,
    measurement: str = "loss",
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """{layer: (H + λI)⁻¹ g_t as (T, d_out, d_in)} for the test rows, original basis.

    Reusable across calls to :func:`pairwise_scores` (``test_gradients=``).
    """
    if measurement not in MEASUREMENTS:
        raise InfluenceError(f"measurement must be one of {MEASUREMENTS}, not {measurement!r}")
    if not isinstance(factors, Factors):
        dev, modules, layout = _solver_setup(model, factors, None, device)
        flat = _solver_test_side(model, modules, layout, factors, test_inputs, test_labels,
                                 measurement, dev, batch_size, None)
        return layout.unflatten(flat)
    dev, modules, ops = _setup(model, factors, device)
    sides = _test_side(
        model, modules, ops, test_inputs, test_labels, measurement, dev, batch_size, None, None
    )
    return {name: to_weight_order(side.matrix, ops[name].perm, 2) for name, side in sides.items()}


def _pair_scores(op: LayerOperator, side: _TestSide, batch: LayerBatch, ws: Workspace) -> Tensor:
    """Σ_jk M_tjk G_ijk for one layer → (n, T), without building G_i when rank one."""
    m = side.matrix
    num_test = m.shape[0]
    a, g = batch.a, batch.g
    n = batch.n
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


def pairwise_scores(
    model: nn.Module,
    factors: Factors,
    train_loader: Iterable,
    test_inputs: Tensor,
    test_labels: Tensor,
    *,
    measurement: str = "loss",
    top: int | None = None,
    device: torch.device | str | None = None,
    on_batch: ProgressCallback | None = None,
    test_gradients: dict[str, Tensor] | None = None,
    test_batch_size: int = 256,
    amp: str | None = None,
) -> Tensor | TopInfluences:
    """score(t, i) = g_tᵀ (H + λI)⁻¹ g_i for test rows t and every training example i.

    Positive ⇒ training example i is a proponent of test row t. The test gradients are
    preconditioned once (or taken from ``test_gradients``), then the training set is
    streamed. top=None returns the full (T, N) matrix; top=k keeps only a running top-k
    and bottom-k per test row (memory independent of N) and returns TopInfluences.
    on_batch stages: "test-gradients", "scores".
    """
    if measurement not in MEASUREMENTS:
        raise InfluenceError(f"measurement must be one of {MEASUREMENTS}, not {measurement!r}")
    if top is not None and top < 1:
        raise InfluenceError(f"top must be a positive integer, not {top!r}")
    if not isinstance(factors, Factors):
        return _solver_pairwise(
            model, factors, train_loader, test_inputs, test_labels, measurement, top, device,
            on_batch, test_gradients, test_batch_size,
        )
    dev, modules, ops = _setup(model, factors, device)
    num_test = len(test_inputs) if test_gradients is None else _num_rows(test_gradients)
    if num_test == 0:
        raise InfluenceError("no test rows to score")
    # Preconditioned test gradients take T × (number of weights) elements; past the
    # budget, test rows are scored in groups, each streaming the training set once.
    per_row = sum(op.d_out * op.d_in for op in ops.values())
    group = max(1, _TEST_GROUP_ELEMENTS // per_row)
    results = []
    for t0 in range(0, num_test, group):
        rows = slice(t0, min(num_test, t0 + group))
        if test_gradients is None:
            sides = _test_side(
                model, modules, ops, test_inputs[rows], torch.as_tensor(test_labels)[rows],
                measurement, dev, test_batch_size, _dataset_size(train_loader), on_batch, amp,
            )
        else:
            missing = set(ops) - set(test_gradients)
            if missing:
                raise InfluenceError(f"test_gradients lack layers {sorted(missing)}")
            dtype = model_dtype(model)
            sides = {
                name: _TestSide(
                    to_internal_order(
                        test_gradients[name][rows].to(device=dev, dtype=dtype), ops[name].perm, 2
                    ),
                    False,
                )
                for name in ops
            }
        results.append(_stream_train(model, modules, ops, sides, train_loader, dev, top, on_batch, amp))
    if top is None:
        result = torch.cat(results, dim=0)
        if not bool(torch.isfinite(result).all()):
            raise InfluenceError("influence scores are not finite (check the damping and inputs)")
        return result
    merged = TopInfluences(*(torch.cat([getattr(r, f) for r in results]) for f in _TOP_FIELDS))
    if not (bool(torch.isfinite(merged.proponent_scores).all()) and bool(torch.isfinite(merged.opponent_scores).all())):
        raise InfluenceError("influence scores are not finite (check the damping and inputs)")
    return merged


_TOP_FIELDS = ("proponent_scores", "proponent_indices", "opponent_scores", "opponent_indices")
_TEST_GROUP_ELEMENTS = 128 * 1024 * 1024


def _num_rows(test_gradients: dict[str, Tensor]) -> int:
    return int(next(iter(test_gradients.values())).shape[0])


def _stream_train(
    model: nn.Module,
    modules: dict[str, nn.Module],
    ops: dict[str, LayerOperator],
    sides: dict[str, _TestSide],
    train_loader: Iterable,
    dev: torch.device,
    top: int | None,
    on_batch: ProgressCallback | None,
    amp: str | None = None,
) -> Tensor | TopInfluences:
    """One pass over the training set for one group of test rows."""
    num_test = next(iter(sides.values())).matrix.shape[0]
    ws = Workspace()

    def blocks() -> Iterator[Tensor]:
        for _n, layers in _captured(
            model, modules, iterate_batches(train_loader, dev), "loss", "scores", on_batch, amp
        ):
            total = None
            for name, batch in layers.items():
                part = _pair_scores(ops[name], sides[name], batch, ws)
                total = part if total is None else total.add_(part)
            yield total.T  # (T, n)

    return _collect_scores(blocks(), num_test, top)


def _collect_scores(blocks: Iterable[Tensor], num_test: int, top: int | None) -> Tensor | TopInfluences:
    """The full (T, N) matrix from streamed (T, n) blocks, or a running top-k / bottom-k
    per row with global training indices (memory independent of N)."""
    full: list[Tensor] = []
    best = worst = None
    offset = 0
    for scores in blocks:
        n = scores.shape[1]
        if top is None:
            full.append(scores.cpu())
        else:
            idx = torch.arange(offset, offset + n, device=scores.device).expand(num_test, n)
            best = _merge_top(best, scores, idx, top, largest=True)
            worst = _merge_top(worst, scores, idx, top, largest=False)
        offset += n
    if offset == 0:
        raise InfluenceError("the training data loader yielded no examples")
    if top is None:
        return torch.cat(full, dim=1)
    assert best is not None and worst is not None
    return TopInfluences(best[0].cpu(), best[1].cpu(), worst[0].cpu(), worst[1].cpu())


def _merge_top(
    current: tuple[Tensor, Tensor] | None, scores: Tensor, idx: Tensor, k: int, largest: bool
) -> tuple[Tensor, Tensor]:
    if current is not None:
        scores = torch.cat([current[0], scores], dim=1)
        idx = torch.cat([current[1], idx], dim=1)
    k = min(k, scores.shape[1])
    values, pos = torch.topk(scores, k, dim=1, largest=largest, sorted=True)
    return values, torch.gather(idx, 1, pos)


# ====================================================== dense / iterative solvers
# ExactSolver and LissaSolver precondition flat vectors over all tracked layers jointly
# (no per-layer eigenbasis), so scores go through explicit flat per-example gradients.
# Self-influence rows are gathered into chunks of this many for one solver call (LiSSA
# solves every row of a chunk as one batch of vectors).
_SOLVER_CHUNK_ROWS = 512


def _solver_setup(model: nn.Module, solver: Any, loader: Iterable | None, device, on_batch=None):
    from influence_cli.influence.curvature import ParameterLayout

    dev = resolve_device(model, device)
    if any(p.device != dev for p in model.parameters()):
        model.to(dev)
    modules = solver.check_model(model)
    if loader is not None and hasattr(solver, "bind"):
        solver.bind(model, loader, dev)
    if hasattr(solver, "on_vectors"):  # iterative solves report each finished chunk
        solver.on_vectors = on_batch
    return dev, modules, ParameterLayout(modules)


def _flat_gradient_batches(
    model: nn.Module,
    modules: dict[str, nn.Module],
    layout: Any,
    batches: Iterable[tuple[Tensor, Tensor]],
    measurement: str,
    stage: str,
    on_batch: ProgressCallback | None,
):
    """(n, flat per-example gradients (n, P)) per batch. The capture hooks are removed
    before each yield, so the caller may run the model (LiSSA's products) in between."""
    from influence_cli.influence.curvature import flat_gradients

    dtype = model_dtype(model)
    for inputs, labels in batches:
        capture = ActivationCapture(modules)
        with torch.no_grad(), eval_mode(model), capture:
            logits = capture.forward(model, inputs)
            with torch.enable_grad():
                loss = measurement_loss(logits, labels, measurement)
                layers = capture.gradients(loss)
            flat = flat_gradients(layout, layers, dtype)
            del logits, loss, layers
        n = int(labels.shape[0])
        yield n, flat
        if on_batch is not None:
            on_batch(stage, n)


def _solver_self_influence(model, solver, loader, device, on_batch) -> Tensor:
    dev, modules, layout = _solver_setup(model, solver, loader, device, on_batch)
    results: list[Tensor] = []
    pending: list[Tensor] = []
    rows = 0

    def flush() -> None:
        nonlocal rows
        if pending:
            results.append(solver.self_scores(torch.cat(pending)).cpu())
            pending.clear()
            rows = 0

    for n, flat in _flat_gradient_batches(
        model, modules, layout, iterate_batches(loader, dev), "loss", "self-influence", on_batch
    ):
        pending.append(flat)
        rows += n
        if rows >= _SOLVER_CHUNK_ROWS:
            flush()
    flush()
    return _finite_self_scores(results)


def _solver_test_side(model, modules, layout, solver, test_inputs, test_labels, measurement,
                      dev, batch_size, on_batch) -> Tensor:
    """(K + λI)⁻¹ g_t as flat rows (T, P), weight column order, solved once."""
    parts = [
        flat
        for _n, flat in _flat_gradient_batches(
            model, modules, layout, _test_batches(test_inputs, test_labels, dev, batch_size),
            measurement, "test-gradients", on_batch,
        )
    ]
    if not parts:
        raise InfluenceError("no test rows to score")
    return solver.precondition_flat(torch.cat(parts))


def _solver_pairwise(model, solver, train_loader, test_inputs, test_labels, measurement, top,
                     device, on_batch, test_gradients, test_batch_size):
    dev, modules, layout = _solver_setup(model, solver, train_loader, device, on_batch)
    if test_gradients is None:
        if len(test_inputs) == 0:
            raise InfluenceError("no test rows to score")
        side = _solver_test_side(model, modules, layout, solver, test_inputs, test_labels,
                                 measurement, dev, test_batch_size, on_batch)
    else:
        missing = set(modules) - set(test_gradients)
        if missing:
            raise InfluenceError(f"test_gradients lack layers {sorted(missing)}")
        side = layout.flatten({name: test_gradients[name] for name in modules})
        side = side.to(device=dev, dtype=model_dtype(model))
    num_test = side.shape[0]
    blocks = (
        side @ flat.T  # (T, n)
        for _n, flat in _flat_gradient_batches(
            model, modules, layout, iterate_batches(train_loader, dev), "loss", "scores", on_batch
        )
    )
    merged = _collect_scores(blocks, num_test, top)
    if top is None:
        if not bool(torch.isfinite(merged).all()):
            raise InfluenceError("influence scores are not finite (check the damping and inputs)")
        return merged
    if not (bool(torch.isfinite(merged.proponent_scores).all()) and bool(torch.isfinite(merged.opponent_scores).all())):
        raise InfluenceError("influence scores are not finite (check the damping and inputs)")
    return merged
