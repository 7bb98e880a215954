"""Batches, devices and dtypes: how the engine reads a loader and places a model.

A loader is any re-iterable of batches whose first two items are inputs and labels
(integer classes, or floating targets for regression: engine/losses.py); a third item, when it is an integer tensor of the batch's length, carries the
examples' global indices (``influence_cli.loaders.BatchLoader`` yields them). Nothing
here prints; progress goes through ``on_batch(stage, n)`` callbacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from influence_cli.engine.losses import label_dtype
from influence_cli.errors import InfluenceError

__all__ = [
    "ProgressCallback",
    "resolve_device",
    "prepare_model",
    "model_dtype",
    "iterate_batches",
    "iterate_indexed_batches",
    "test_batches",
    "autocast",
    "AMP_DTYPES",
    "expected_examples",
    "count_examples",
    "dataset_size",
]

ProgressCallback = Callable[[str, int], None]
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """None → the model's device; "auto" → cuda if available else cpu."""
    if device is None:
        for p in model.parameters():
            return p.device
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def prepare_model(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The resolved device, with the model moved there when any parameter is elsewhere."""
    dev = resolve_device(model, device)
    if any(p.device != dev for p in model.parameters()):
        model.to(dev)
    return dev


def model_dtype(model: nn.Module) -> torch.dtype:
    """Compute dtype: the model's floating dtype, at least float32."""
    for p in model.parameters():
        if p.is_floating_point():
            return torch.promote_types(p.dtype, torch.float32)
    return torch.float32


def iterate_batches(loader: Iterable, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, labels) on ``device`` from batches whose first two items are those."""
    for inputs, labels, _index in iterate_indexed_batches(loader, device):
        yield inputs, labels


def iterate_indexed_batches(
    loader: Iterable, device: torch.device
) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """(inputs, labels, example indices or None) on ``device``; the indices are a batch's
    third item when it is an integer tensor of the batch's length (BatchLoader yields the
    global index of every example there)."""
    for batch in loader:
        if isinstance(batch, dict):
            raise InfluenceError("batches must be (inputs, labels, ...) sequences, not dicts")
        inputs, labels = batch[0], batch[1]
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        index = None
        if len(batch) > 2:
            third = batch[2]
            if not isinstance(third, Tensor):
                try:
                    third = torch.as_tensor(third)
                except (TypeError, ValueError, RuntimeError):
                    third = None
            if (
                third is not None
                and third.dim() == 1
                and len(third) == len(labels)
                and not third.is_floating_point()
                and not third.is_complex()
            ):
                index = third.cpu().to(torch.int64)
        yield inputs.to(device, non_blocking=True), labels.to(device=device, dtype=label_dtype(labels)), index


def test_batches(
    inputs: Tensor, labels: Tensor, device: torch.device, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, labels) of test rows in slices of ``batch_size``, on ``device``."""
    labels = torch.as_tensor(labels)
    if len(inputs) != len(labels):
        raise InfluenceError(f"{len(inputs)} test inputs but {len(labels)} test labels")
    for start in range(0, len(inputs), batch_size):
        yield (
            inputs[start : start + batch_size].to(device),
            labels[start : start + batch_size].to(device=device, dtype=label_dtype(labels)),
        )


def autocast(device: torch.device, amp: str | None):
    """Autocast context for the model's forward/backward (``amp`` None → no-op).

    Only the model runs in reduced precision; captured activations and gradients are cast
    back to float32 (ActivationCapture) and every accumulation stays float32/64.
    """
    if not amp:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise InfluenceError(f"amp must be bfloat16, float16 or null, not {amp!r}")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def expected_examples(loader: Iterable, first_batch: int) -> int | None:
    """How many examples the loader will yield, if it can tell without iterating."""
    count = getattr(loader, "num_examples", None)
    if isinstance(count, int):
        return count
    try:
        return len(loader) * first_batch  # type: ignore[arg-type]
    except TypeError:
        pass
    dataset = getattr(loader, "dataset", None)
    try:
        return None if dataset is None else len(dataset)
    except TypeError:
        return None


def count_examples(loader: Iterable) -> int:
    """Examples the loader yields (a ``num_examples`` attribute, else one pass over it;
    ``len(loader.dataset)`` is not trusted: samplers and index subsets change it)."""
    count = getattr(loader, "num_examples", None)
    if isinstance(count, int):
        return count
    return sum(int(len(batch[1])) for batch in loader)


def dataset_size(loader: Iterable) -> int | None:
    """Approximate number of training examples (only steers a flop-count choice): the
    loader's ``num_examples`` attribute, else ``len(loader.dataset)``, else None."""
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
