"""Batches, devices and dtypes: how the engine reads a loader and places a model.

A loader is any re-iterable of batches: ``(inputs, labels[, index])`` sequences or dicts
(``engine/batches.py`` says how each shape is read); labels are integer classes, or
floating targets for regression (engine/losses.py); an index item, when it is an integer
tensor of the batch's length, carries the examples' global indices
(``influence_cli.loaders.BatchLoader`` yields them). Nothing here prints; progress goes
through ``on_batch(stage, n)`` callbacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from influence_cli.engine.batches import batch_size, slice_inputs, split_batch, to_device
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


def iterate_batches(loader: Iterable, device: torch.device) -> Iterator[tuple[Any, Tensor]]:
    """(inputs, labels) on ``device``; inputs keep the batch's structure (tensor, dict, tuple)."""
    for inputs, labels, _index in iterate_indexed_batches(loader, device):
        yield inputs, labels


def iterate_indexed_batches(
    loader: Iterable, device: torch.device
) -> Iterator[tuple[Any, Tensor, Tensor | None]]:
    """(inputs, labels, example indices or None) on ``device``; the indices are the batch's
    index item when it is an integer tensor of the batch's length (BatchLoader yields the
    global index of every example there)."""
    for batch in loader:
        inputs, labels, third = split_batch(batch)
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        index = None
        if third is not None:
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
        yield to_device(inputs, device), labels.to(device=device, dtype=label_dtype(labels)), index


def test_batches(
    inputs: Any, labels: Tensor, device: torch.device, batch_size_: int
) -> Iterator[tuple[Any, Tensor]]:
    """(inputs, labels) of test rows in slices of ``batch_size_``, on ``device``; inputs
    may be a tensor or a dict/tuple of batch-first tensors."""
    labels = torch.as_tensor(labels)
    rows = batch_size(inputs)
    if rows != len(labels):
        raise InfluenceError(f"{rows} test inputs but {len(labels)} test labels")
    for start in range(0, rows, batch_size_):
        part = slice(start, start + batch_size_)
        yield (
            to_device(slice_inputs(inputs, part), device),
            labels[part].to(device=device, dtype=label_dtype(labels)),
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
    return sum(int(len(split_batch(batch)[1])) for batch in loader)


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
