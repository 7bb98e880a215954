"""Self-influence and pairwise influence scores: one loop for every strategy.

Signs: score(t, i) = g_tᵀ (H + λI)⁻¹ g_i. Positive ⇒ training example i is a proponent
of test example t (up-weighting it lowers the test loss / raises the margin); negative ⇒
opponent. Self-influence(i) = g_iᵀ (H + λI)⁻¹ g_i ≥ 0 for positive semi-definite
curvature. Scores are raw inner products; their scale depends on the model. Training
gradients always use the given labels.

The loop captures each batch's per-layer (a, g) (``amp`` autocasts the model for every
strategy) and hands them to the preconditioner bound to the model — ``bind(model, device,
loader=, on_batch=)`` of a fitted strategy, see :class:`BoundPreconditioner` — which
turns them into scores with its own fast paths. The finiteness check is here, once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from influence_cli.engine.batching import (
    ProgressCallback,
    autocast,
    dataset_size,
    iterate_batches,
    prepare_model,
    test_batches,
)
from influence_cli.engine.capture import ActivationCapture, LayerBatch
from influence_cli.engine.kernels import Workspace
from influence_cli.engine.losses import MEASUREMENTS, measurement_loss
from influence_cli.engine.tracked import eval_mode
from influence_cli.errors import InfluenceError

__all__ = [
    "self_influence",
    "pairwise_scores",
    "preconditioned_test_gradients",
    "gradient_batches",
    "TopInfluences",
    "BoundPreconditioner",
    "measurement_loss",
    "MEASUREMENTS",
]

# Preconditioned test gradients take T × (number of weights) elements; past this budget,
# test rows are scored in groups, each streaming the training set once.
TEST_GROUP_ELEMENTS = 128 * 1024 * 1024
_SELF_MESSAGE = "self-influence produced non-finite values (check the damping and inputs)"
_PAIR_MESSAGE = "influence scores are not finite (check the damping and inputs)"


class BoundPreconditioner(Protocol):
    """A fitted preconditioner on one model, as the scoring loop drives it.

    ``modules``: the tracked {name: module} to capture. Self-influence: ``self_part``
    reduces one captured batch to what must outlive it (the capture's buffers are reused);
    ``self_scores`` turns the parts of up to ``chunk_rows`` rows (0: each batch alone)
    into (n,) scores. Pairwise: ``test_side`` preconditions the captured test batches
    once; ``pair_scores`` contracts it with one training batch → (T, n).
    """

    modules: dict[str, nn.Module]
    chunk_rows: int
    row_elements: int  # elements of one preconditioned test row

    def self_part(self, layers: dict[str, LayerBatch]) -> Any: ...

    def self_scores(self, parts: list[Any]) -> Tensor: ...

    def test_side(self, batches: Iterable[tuple[int, dict[str, LayerBatch]]], num_test: int,
                  num_train: int | None) -> Any: ...

    def side_from_gradients(self, grads: dict[str, Tensor], rows: slice) -> Any: ...

    def export_side(self, side: Any) -> dict[str, Tensor]: ...

    def side_rows(self, side: Any) -> int: ...

    def pair_scores(self, side: Any, layers: dict[str, LayerBatch]) -> Tensor: ...


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


_TOP_FIELDS = ("proponent_scores", "proponent_indices", "opponent_scores", "opponent_indices")


def gradient_batches(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[tuple[Tensor, Tensor]],
    measurement: str = "loss",
    stage: str = "",
    on_batch: ProgressCallback | None = None,
    amp: str | None = None,
) -> Iterator[tuple[int, dict[str, LayerBatch]]]:
    """(n, {layer: LayerBatch}) per batch, gradients of ``measurement`` with the given
    labels; on_batch(stage, n) after the consumer is done with each batch.

    The capture hooks, eval mode and no-grad are held only while a batch is captured, so
    the consumer may run the model in between (LiSSA's curvature products). ``amp``
    autocasts the model's forward/backward only; captured (a, g) come back float32. The
    yielded tensors may live in reused buffers: valid until the next batch.
    """
    capture = ActivationCapture(modules, workspace=Workspace())
    for inputs, labels in batches:
        with torch.no_grad(), eval_mode(model), capture:
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


def _bind(model: nn.Module, factors: Any, device: Any, loader: Any = None, on_batch: Any = None) -> Any:
    dev = prepare_model(model, device)
    return dev, factors.bind(model, dev, loader=loader, on_batch=on_batch)


def _finite(result: Tensor | TopInfluences, message: str) -> Tensor | TopInfluences:
    """The one finiteness check of every score the engine returns."""
    values = [result] if isinstance(result, Tensor) else [result.proponent_scores, result.opponent_scores]
    if not all(bool(torch.isfinite(v).all()) for v in values):
        raise InfluenceError(message)
    return result


def _check_measurement(measurement: str) -> None:
    if measurement not in MEASUREMENTS:
        raise InfluenceError(f"measurement must be one of {MEASUREMENTS}, not {measurement!r}")


def self_influence(
    model: nn.Module,
    factors: Any,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    on_batch: ProgressCallback | None = None,
    amp: str | None = None,
) -> Tensor:
    """s_i = g_iᵀ (H + λI)⁻¹ g_i for every example, in loader order → (N,).

    ``factors``: what any strategy fitted (``fit_factors`` / ``load_factors``). Uses the
    given labels. on_batch("self-influence", n) after each batch. amp:
    "bfloat16"/"float16" autocast for the model's forward/backward only.
    """
    dev, bound = _bind(model, factors, device, loader, on_batch)
    results: list[Tensor] = []
    pending: list[Any] = []
    rows = 0
    for n, layers in gradient_batches(
        model, bound.modules, iterate_batches(loader, dev), "loss", "self-influence", on_batch, amp
    ):
        pending.append(bound.self_part(layers))
        rows += n
        if rows >= bound.chunk_rows:
            results.append(bound.self_scores(pending).cpu())
            pending, rows = [], 0
    if pending:
        results.append(bound.self_scores(pending).cpu())
    if not results:
        raise InfluenceError("the data loader yielded no examples")
    return _finite(torch.cat(results), _SELF_MESSAGE)


def preconditioned_test_gradients(
    model: nn.Module,
    factors: Any,
    test_inputs: Tensor,
    test_labels: Tensor,
    *,
    measurement: str = "loss",
    device: torch.device | str | None = None,
    batch_size: int = 256,
    amp: str | None = None,
) -> dict[str, Tensor]:
    """{layer: (H + λI)⁻¹ g_t as (T, d_out, d_in)} for the test rows, original basis.

    Reusable across calls to :func:`pairwise_scores` (``test_gradients=``).
    """
    _check_measurement(measurement)
    dev, bound = _bind(model, factors, device)
    batches = gradient_batches(
        model, bound.modules, test_batches(test_inputs, test_labels, dev, batch_size), measurement,
        "test-gradients", None, amp,
    )
    return bound.export_side(bound.test_side(batches, len(test_inputs), None))


def pairwise_scores(
    model: nn.Module,
    factors: Any,
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
    test_group_rows: int | None = None,
    query_rank: int = 0,
) -> Tensor | TopInfluences:
    """score(t, i) = g_tᵀ (H + λI)⁻¹ g_i for test rows t and every training example i.

    Positive ⇒ training example i is a proponent of test row t. The test gradients are
    preconditioned once (or taken from ``test_gradients``), then the training set is
    streamed. top=None returns the full (T, N) matrix; top=k keeps only a running top-k
    and bottom-k per test row (memory independent of N) and returns TopInfluences.
    test_group_rows: test rows per pass over the training set (default: as many as fit
    in 128 Mi preconditioned elements). on_batch stages: "test-gradients", "scores".
    query_rank=k > 0: an approximation — each layer's preconditioned test gradient is
    replaced by its best rank-k approximation (``engine.lowrank``); 0 = exact.
    """
    _check_measurement(measurement)
    if top is not None and top < 1:
        raise InfluenceError(f"top must be a positive integer, not {top!r}")
    if test_group_rows is not None and test_group_rows < 1:
        raise InfluenceError(f"test_group_rows must be a positive integer, not {test_group_rows!r}")
    if isinstance(query_rank, bool) or not isinstance(query_rank, int) or query_rank < 0:
        raise InfluenceError(f"query_rank must be 0 (exact) or a positive integer, not {query_rank!r}")
    dev, bound = _bind(model, factors, device, train_loader, on_batch)
    num_test = len(test_inputs) if test_gradients is None else int(next(iter(test_gradients.values())).shape[0])
    if num_test == 0:
        raise InfluenceError("no test rows to score")
    group = test_group_rows or max(1, TEST_GROUP_ELEMENTS // max(1, bound.row_elements))
    results = []
    for t0 in range(0, num_test, group):
        rows = slice(t0, min(num_test, t0 + group))
        if test_gradients is None:
            batches = gradient_batches(
                model, bound.modules,
                test_batches(test_inputs[rows], torch.as_tensor(test_labels)[rows], dev, test_batch_size),
                measurement, "test-gradients", on_batch, amp,
            )
            side = bound.test_side(batches, rows.stop - rows.start, dataset_size(train_loader))
        else:
            side = bound.side_from_gradients(test_gradients, rows)
        if query_rank:
            side = _low_rank_side(bound, side, query_rank)
        blocks = (
            bound.pair_scores(side, layers)
            for _n, layers in gradient_batches(
                model, bound.modules, iterate_batches(train_loader, dev), "loss", "scores", on_batch, amp
            )
        )
        results.append(_collect_scores(blocks, bound.side_rows(side), top))
    if top is None:
        return _finite(torch.cat(results, dim=0), _PAIR_MESSAGE)
    return _finite(TopInfluences(*(torch.cat([getattr(r, f) for r in results]) for f in _TOP_FIELDS)), _PAIR_MESSAGE)


def _low_rank_side(bound: Any, side: Any, k: int) -> Any:
    """The test side with each layer's matrix truncated to rank k: the preconditioner's own
    fast form when it has one, else (flat solvers) dense, through its per-layer export."""
    native = getattr(bound, "low_rank_side", None)
    if native is not None:
        return native(side, k)
    from influence_cli.engine.lowrank import rank_k

    grads = {name: rank_k(m, k) for name, m in bound.export_side(side).items()}
    return bound.side_from_gradients(grads, slice(None))


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
