"""Batches and model outputs of any shape: the one place that knows their structure.

Why one module: every loop of the engine (fitting passes, scoring, the dense and LiSSA
solvers, Fisher sampling) needs the same four answers about a batch — which part goes
into the model, which part is the labels, which positions are padding, and where the
logits are in what the model returned. Keeping them here means a new batch shape is
one edit, not one per loop.

A batch is either
- a sequence ``(inputs, labels[, index])``: ``inputs`` a tensor (``model(x)``), a dict of
  keyword arguments (``model(**inputs)``) or a tuple/list of positional arguments
  (``model(*inputs)``); or
- a dict (Hugging Face style): ``labels`` (or ``label``) are the labels, ``index`` the
  optional global example indices, every other key is a keyword argument of the model.

Padding: a dict input's ``attention_mask`` (n, T) marks real tokens; a model fed a plain
tensor can name its mask with a ``position_mask(inputs) -> (n, T)`` method (the packed
text classifiers of ``influence_cli.hf`` do). Outputs may be a tensor, an object with
``.logits`` (Hugging Face ``ModelOutput``) or a tuple whose first item is the logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from influence_cli.errors import InfluenceError

__all__ = [
    "LABEL_KEYS",
    "batch_device",
    "batch_size",
    "call_model",
    "forward_logits",
    "functional_logits",
    "logits_of",
    "position_mask",
    "slice_inputs",
    "split_batch",
    "to_device",
]

LABEL_KEYS = ("labels", "label")
INDEX_KEY = "index"
MASK_KEY = "attention_mask"


def to_device(inputs: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts, tuples and lists) moved to ``device``."""
    if isinstance(inputs, Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


def split_batch(batch: Any) -> tuple[Any, Any, Any]:
    """(model inputs, labels, raw index item or None) of one batch, as the loader gave it."""
    if isinstance(batch, dict):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        if key is None:
            raise InfluenceError(
                f"a dict batch needs a 'labels' (or 'label') entry; it has {', '.join(map(repr, batch))}"
            )
        inputs = {k: v for k, v in batch.items() if k not in (*LABEL_KEYS, INDEX_KEY)}
        return inputs, batch[key], batch.get(INDEX_KEY)
    if isinstance(batch, Tensor) or not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise InfluenceError(
            "a batch must be (inputs, labels[, index]) or a dict with 'labels'; got "
            + type(batch).__name__
        )
    return batch[0], batch[1], batch[2] if len(batch) > 2 else None


def _first_tensor(inputs: Any) -> Tensor:
    if isinstance(inputs, Tensor):
        return inputs
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise InfluenceError(f"model inputs must be a tensor or hold tensors, not {type(inputs).__name__}")


def batch_size(inputs: Any) -> int:
    """Rows of a batch's model inputs (the first dimension of its first tensor; the
    length of any other sized object, e.g. lazily decoded inputs)."""
    if not isinstance(inputs, (Tensor, dict, tuple, list)) and hasattr(inputs, "__len__"):
        return len(inputs)
    return int(_first_tensor(inputs).shape[0])


def batch_device(inputs: Any) -> torch.device:
    return _first_tensor(inputs).device


def slice_inputs(inputs: Any, rows: Any) -> Any:
    """The same structure with every batch-first tensor indexed by ``rows``."""
    if isinstance(inputs, Tensor):
        return inputs[rows]
    if isinstance(inputs, dict):
        return {k: slice_inputs(v, rows) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(slice_inputs(v, rows) for v in inputs)
    return inputs[rows] if hasattr(inputs, "__getitem__") else inputs  # e.g. lazily decoded inputs


def call_model(model: nn.Module, inputs: Any) -> Any:
    """model(x), model(**kwargs) or model(*args), by the structure of ``inputs``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def functional_logits(model: nn.Module, params: dict[str, Tensor], inputs: Any) -> Tensor:
    """Logits of ``torch.func.functional_call`` with the batch's structure."""
    from torch.func import functional_call

    if isinstance(inputs, dict):
        return logits_of(functional_call(model, params, (), inputs))
    if isinstance(inputs, (tuple, list)):
        return logits_of(functional_call(model, params, tuple(inputs)))
    return logits_of(functional_call(model, params, (inputs,)))


def logits_of(output: object) -> Tensor:
    """The logits tensor of a model output (tensor, object with .logits, or tuple)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise InfluenceError("the model must return a logits tensor of shape (N, classes)")


def forward_logits(model: nn.Module, inputs: Any) -> Tensor:
    return logits_of(call_model(model, inputs))


def position_mask(model: nn.Module, inputs: Any) -> Tensor | None:
    """(n, T) with 1 for real tokens and 0 for padding, or None (no sequence padding)."""
    mask = inputs.get(MASK_KEY) if isinstance(inputs, dict) else None
    if mask is None and not isinstance(inputs, (dict, tuple, list)):
        method = getattr(model, "position_mask", None)
        mask = method(inputs) if callable(method) else None
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise InfluenceError("attention_mask must be an (N, T) tensor of 0/1")
    return mask
