"""The fitting context of the block strategies and the captured batches they consume.

``captured_batches`` runs the model over the loader with the capture hooks and yields
each tracked layer's (a, g), with labels sampled from the model (true Fisher) or given
(empirical). ``reduce_sums`` all-reduces un-normalised sums over a process group.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from influence_cli.engine.batching import (
    ProgressCallback,
    autocast,
    count_examples,
    iterate_indexed_batches,
    prepare_model,
)
from influence_cli.engine.capture import ActivationCapture, LayerBatch
from influence_cli.engine.kernels import Workspace
from influence_cli.engine.losses import fisher_labels, task_loss
from influence_cli.engine.tracked import eval_mode, layer_kind, layer_shape, tracked_modules
from influence_cli.errors import InfluenceError

__all__ = [
    "FitContext",
    "BatchData",
    "make_context",
    "captured_batches",
    "replay",
    "reduce_sums",
    "world_size",
    "DEFAULT_CACHE_BYTES",
]

DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
BatchData = tuple[int, dict[str, LayerBatch]]  # (batch size, captured (a, g) per layer)


@dataclass
class FitContext:
    """Everything a block strategy's ``fit_layers`` needs."""

    model: nn.Module
    loader: Iterable
    modules: dict[str, nn.Module]
    device: torch.device
    fisher: str
    seed: int
    on_batch: ProgressCallback | None
    reference: bool = False
    cache_bytes: int = 0
    dist: Any = None  # DistContext-like (world_size, rank, all_reduce_sum, broadcast) or None
    amp: str | None = None  # "bfloat16" | "float16": autocast the forward/backward only

    def layer_info(self, name: str) -> tuple[str, int, int, bool]:
        """(kind, d_out, d_in, has_bias) of a tracked layer."""
        module = self.modules[name]
        d_out, d_in, has_bias = layer_shape(module)
        return layer_kind(module), d_out, d_in, has_bias

    def zero_eigenvalues(self) -> dict[str, Tensor]:
        """{layer: zeros (d_out, d_in)} in float64 (no curvature)."""
        out = {}
        for name in self.modules:
            _kind, d_out, d_in, _bias = self.layer_info(name)
            out[name] = torch.zeros(d_out, d_in, dtype=torch.float64)
        return out

    def count_examples(self) -> int:
        """Examples of the whole data set (summed over ranks)."""
        return reduce_sums(self.dist, {}, {"examples": count_examples(self.loader)})[1]["examples"]


def make_context(
    model: nn.Module, loader: Iterable, fisher: str, modules: Any, device: Any, seed: int,
    on_batch: ProgressCallback | None, amp: str | None, reference: bool = False, cache_bytes: int = 0,
    dist: Any = None,
) -> FitContext:
    """Validated fitting context: Fisher mode, the model on its device, the tracked layers."""
    if fisher not in ("true", "empirical"):
        raise InfluenceError(f"fisher must be 'true' or 'empirical', not {fisher!r}")
    dev = prepare_model(model, device)
    tracked = tracked_modules(model, modules)
    return FitContext(model, loader, tracked, dev, fisher, seed, on_batch, reference, cache_bytes, dist, amp)


def captured_batches(
    ctx: FitContext, stage: str, workspace: Workspace | None = None
) -> Iterator[tuple[int, dict[str, LayerBatch]]]:
    """(batch size, {layer: (a, g)}) per batch, with Fisher labels as configured.

    True-Fisher labels are drawn per example from (seed, example index) — the loader's
    third batch item when it carries indices, else the position in loader order — so
    both fitting passes, any batching and any sharding see the same labels. The yielded
    tensors may live in ``workspace`` (valid until the next batch) unless it is disabled.
    """
    capture = ActivationCapture(ctx.modules, workspace=workspace or Workspace())
    offset = 0
    with torch.no_grad(), eval_mode(ctx.model), capture:
        for inputs, labels, index in iterate_indexed_batches(ctx.loader, ctx.device):
            n = int(labels.shape[0])
            if index is None:
                index = torch.arange(offset, offset + n)
            offset += n
            with autocast(ctx.device, ctx.amp):
                logits = capture.forward(ctx.model, inputs)
            if ctx.fisher == "true":
                labels = fisher_labels(logits, labels, ctx.seed, index).to(logits.device)
            with torch.enable_grad(), autocast(ctx.device, ctx.amp):
                loss = task_loss(logits, labels)
                layers = capture.gradients(loss)
            del logits, loss
            yield n, layers
            if ctx.on_batch is not None:
                ctx.on_batch(stage, n)


def replay(ctx: FitContext, cache: list[BatchData], stage: str) -> Iterator[BatchData]:
    """Iterate cached batches as if they were captured again (with progress)."""
    for n, layers in cache:
        yield n, layers
        if ctx.on_batch is not None:
            ctx.on_batch(stage, n)


def world_size(dist: Any) -> int:
    return 1 if dist is None else int(getattr(dist, "world_size", 1))


def reduce_sums(dist: Any, tensors: dict[str, Tensor], counts: dict[str, int]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """All-reduce (sum) un-normalised accumulators and integer counts over ranks."""
    if world_size(dist) <= 1:
        return tensors, counts
    out = {key: dist.all_reduce_sum(tensors[key].to(torch.float64)) for key in sorted(tensors)}
    keys = sorted(counts)
    summed = dist.all_reduce_sum(torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64))
    return out, {k: int(round(float(v))) for k, v in zip(keys, summed.tolist())}
