"""Influence of every training example on a whole query set, in one pass:

    value_i = Σ_{t∈T} g_tᵀ (H + λI)⁻¹ g_i  =  (P Σ_t g_t)ᵀ g_i.

The preconditioner P is linear, so the query gradients are summed per layer while they
are streamed (memory independent of |T|), the sum is preconditioned once, as the gradient
of ONE virtual example, and contracted with every training example in a single streaming
pass — the pairwise machinery with one test row, so plain Linear layers keep their
rank-one contraction and every strategy (block ones, exact, LiSSA, plug-ins) works
through the :class:`~influence_cli.engine.scoring.BoundPreconditioner` protocol alone.

Signs as in :func:`~influence_cli.engine.scoring.pairwise_scores`: positive ⇒ up-weighting
training example i lowers the query set's loss (raises its margin): helpful; negative ⇒
harmful. ``reduce="mean"`` divides by |T|.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from influence_cli.engine.batching import (
    ProgressCallback,
    dataset_size,
    iterate_batches,
    test_batches,
)
from influence_cli.engine.capture import LayerBatch
from influence_cli.engine.scoring import _bind, _check_measurement, _finite, gradient_batches
from influence_cli.errors import InfluenceError

__all__ = ["REDUCTIONS", "as_one_example", "summed_query_gradients", "value_scores"]

REDUCTIONS = ("sum", "mean")
_VALUE_MESSAGE = "value scores are not finite (check the damping and inputs)"


def _sum_layer_gradients(batches: Iterable[tuple[int, dict[str, LayerBatch]]], reduce: str) -> dict[str, LayerBatch]:
    """Σ_t G_t (or the mean) per layer, internal column order, as one virtual example."""
    sums: dict[str, Tensor] = {}
    perms: dict[str, Tensor | None] = {}
    count = 0
    for n, layers in batches:
        for name, batch in layers.items():
            # Σ_t Σ_p g_tp a_tpᵀ is one GEMM over the (example, position) rows; the
            # captured tensors live in reused buffers, the product is a fresh tensor.
            part = batch.g.reshape(-1, batch.g.shape[-1]).T @ batch.a.reshape(-1, batch.a.shape[-1])
            sums[name] = part if name not in sums else sums[name].add_(part)
            perms[name] = batch.perm
        count += n
    if count == 0:
        raise InfluenceError("no query rows to score")
    scale = 1.0 / count if reduce == "mean" else 1.0
    return {name: as_one_example(total.mul_(scale), perms[name]) for name, total in sums.items()}


def as_one_example(grad: Tensor, perm: Tensor | None = None) -> LayerBatch:
    """A (d_out, d_in) gradient as the captured batch of one example with
    k = min(d_out, d_in) positions: G = Σ_p g_p a_pᵀ with e_p on the smaller side."""
    d_out, d_in = grad.shape
    if d_out <= d_in:
        g = torch.eye(d_out, dtype=grad.dtype, device=grad.device)
        a = grad
    else:
        g = grad.T
        a = torch.eye(d_in, dtype=grad.dtype, device=grad.device)
    return LayerBatch(a.contiguous()[None], g.contiguous()[None], perm)


def _query_side(bound: Any, model: nn.Module, dev: torch.device, query_inputs: Tensor, query_labels: Tensor,
                measurement: str, reduce: str, batch_size: int, amp: str | None,
                on_batch: ProgressCallback | None, num_train: int | None) -> Any:
    """P Σ_t g_t (or its mean) as the bound preconditioner's one-row test side."""
    batches = gradient_batches(
        model, bound.modules, test_batches(query_inputs, query_labels, dev, batch_size), measurement,
        "query-gradients", on_batch, amp,
    )
    return bound.test_side(iter([(1, _sum_layer_gradients(batches, reduce))]), 1, num_train)


def summed_query_gradients(
    model: nn.Module,
    factors: Any,
    query_inputs: Tensor,
    query_labels: Tensor,
    *,
    measurement: str = "loss",
    reduce: str = "sum",
    device: torch.device | str | None = None,
    batch_size: int = 256,
    amp: str | None = None,
) -> dict[str, Tensor]:
    """{layer: P Σ_t g_t as (1, d_out, d_in)} in weight column order, original basis —
    the form :func:`~influence_cli.engine.scoring.pairwise_scores` takes as ``test_gradients``."""
    _check_arguments(measurement, reduce)
    dev, bound = _bind(model, factors, device)
    side = _query_side(bound, model, dev, query_inputs, query_labels, measurement, reduce, batch_size, amp, None, None)
    return bound.export_side(side)


def value_scores(
    model: nn.Module,
    factors: Any,
    train_loader: Iterable,
    query_inputs: Tensor,
    query_labels: Tensor,
    *,
    measurement: str = "loss",
    reduce: str = "sum",
    device: torch.device | str | None = None,
    on_batch: ProgressCallback | None = None,
    query_batch_size: int = 256,
    amp: str | None = None,
) -> Tensor:
    """value_i = Σ_t g_tᵀ (H + λI)⁻¹ g_i for every training example, in loader order → (N,).

    Equals the column sums of ``pairwise_scores(..., top=None)`` over the query rows
    (``reduce="mean"``: their mean) at the cost of one pass over the queries, one solve
    and one pass over the training set. on_batch stages: "query-gradients", "value".
    """
    _check_arguments(measurement, reduce)
    dev, bound = _bind(model, factors, device, train_loader, on_batch)
    side = _query_side(bound, model, dev, query_inputs, query_labels, measurement, reduce,
                       query_batch_size, amp, on_batch, dataset_size(train_loader))
    parts = [
        bound.pair_scores(side, layers)[0].cpu()
        for _n, layers in gradient_batches(
            model, bound.modules, iterate_batches(train_loader, dev), "loss", "value", on_batch, amp
        )
    ]
    if not parts:
        raise InfluenceError("the training data loader yielded no examples")
    return _finite(torch.cat(parts), _VALUE_MESSAGE)


def _check_arguments(measurement: str, reduce: str) -> None:
    _check_measurement(measurement)
    if reduce not in REDUCTIONS:
        raise InfluenceError(f"reduce must be one of {REDUCTIONS}, not {reduce!r}")
