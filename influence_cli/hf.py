"""Hugging Face text classifiers: the optional ``hf`` extra (``pip install -e ".[hf]"``).

Only ``model.arch: hf`` and ``data.source: hf_dataset`` import this module, and it imports
``transformers`` inside its functions, so the core never needs it.

Why a packed tensor: every in-memory source keeps one tensor per split, so that batch
slicing, the decoded-data fingerprint, label noise, subsets and the query rows of
``infl score`` work unchanged. A tokenised split is packed as (N, 3, T) — input ids,
attention mask, token type ids — and ``PackedTextClassifier`` unpacks it for the model.
Its ``position_mask`` tells the engine which positions are padding
(``engine/batches.position_mask``), so sequence Linear layers skip them.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influence_cli.errors import DataError, ModelError

__all__ = [
    "DEFAULT_LAST_BLOCKS",
    "PackedTextClassifier",
    "build_hf_model",
    "default_modules",
    "load_tokenizer",
    "model_location",
    "require_transformers",
    "tokenise",
]

PACKED_FIELDS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_LAST_BLOCKS = 2
# Linear layers of one transformer block that carry attention and MLP weights, by the
# names of the common families (BERT/RoBERTa/ELECTRA, DistilBERT, GPT-2 uses Conv1D).
_BLOCK_LINEARS = (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense",                      # BERT-like
    "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
    "ffn.lin1", "ffn.lin2",                                    # DistilBERT
)
_HEAD_PATTERNS = ("classifier", "classifier.*", "score", "pre_classifier")


def require_transformers() -> Any:
    """The transformers module, or a one-line ModelError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ModelError(
            "model.arch hf needs the optional Hugging Face extra: pip install 'influence-cli[hf]' "
            "(transformers, datasets)"
        ) from None
    return transformers


def model_location(cfg: Any, base_dir: Path | None = None) -> str:
    """model.name_or_path (``cfg`` is the model section) resolved against the config
    folder when it is a local folder; a hub name needs model.allow_download: true."""
    value = cfg.name_or_path
    if not value:
        raise ModelError("model.arch hf needs model.name_or_path: the folder of a saved Hugging Face model")
    local = Path(value).expanduser()
    if not local.is_absolute() and base_dir is not None:
        local = Path(base_dir) / local
    if local.is_dir():
        return str(local)
    if cfg.allow_download:
        return str(value)
    raise ModelError(
        f"model.name_or_path: {local} is not a folder; save the model there with save_pretrained, "
        "or set model.allow_download: true to fetch it from the Hugging Face hub"
    )


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def load_tokenizer(cfg: Any, base_dir: Path | None = None) -> Any:
    """The model's tokenizer (from model.name_or_path; local files only by default)."""
    transformers = require_transformers()
    where = model_location(cfg, base_dir)
    try:
        with _quiet_transformers(transformers):
            return transformers.AutoTokenizer.from_pretrained(where, local_files_only=not cfg.allow_download)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model.name_or_path: cannot load a tokenizer from {where}: {_first_line(exc)}") from None


class PackedTextClassifier(nn.Module):
    """A Hugging Face sequence classifier fed (N, 3, T) packed tokens; returns logits.

    ``influence_modules`` is the engine's default selection when influence.modules is
    not set: ``default_modules`` (last blocks' attention and MLP projections + head).
    """

    def __init__(self, model: nn.Module, last_blocks: int = DEFAULT_LAST_BLOCKS):
        super().__init__()
        self.model = model
        self.uses_token_types = "token_type_ids" in _forward_parameters(model)
        self.influence_modules = default_modules(self, last_blocks)

    def position_mask(self, packed: torch.Tensor) -> torch.Tensor:
        """(N, T): 1 for real tokens, 0 for padding (read by the influence engine)."""
        return packed[:, 1].long()

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        packed = packed.long()
        kwargs = {"input_ids": packed[:, 0], "attention_mask": packed[:, 1]}
        if self.uses_token_types and packed.shape[1] > 2:
            kwargs["token_type_ids"] = packed[:, 2]
        return self.model(**kwargs).logits


def _forward_parameters(model: nn.Module) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def build_hf_model(cfg: Any, num_classes: int, base_dir: Path | None = None) -> nn.Module:
    """AutoModelForSequenceClassification from model.name_or_path with ``num_classes``
    outputs (a head of another size is replaced by a freshly seeded one), wrapped."""
    transformers = require_transformers()
    where = model_location(cfg, base_dir)
    try:
        with _quiet_transformers(transformers):
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                where, num_labels=num_classes, local_files_only=not cfg.allow_download,
                ignore_mismatched_sizes=True,
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"model.name_or_path: cannot load a sequence classifier from {where}: {_first_line(exc)}") from None
    return PackedTextClassifier(model)


class _quiet_transformers:
    """Keep transformers' load report (newly initialised head, ...) off the terminal."""

    def __init__(self, transformers: Any):
        self.logging = transformers.utils.logging

    def __enter__(self) -> None:
        self.level = self.logging.get_verbosity()
        self.bars = self.logging.is_progress_bar_enabled()
        self.logging.set_verbosity_error()
        self.logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        self.logging.set_verbosity(self.level)
        if self.bars:
            self.logging.enable_progress_bar()


def tokenise(tokenizer: Any, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """(N, 3, max_length) int64: ids, attention mask, token types (zeros if absent)."""
    encoded = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt",
    )
    ids = encoded["input_ids"]
    mask = encoded.get("attention_mask")
    types = encoded.get("token_type_ids")
    mask = torch.ones_like(ids) if mask is None else mask
    types = torch.zeros_like(ids) if types is None else types
    if ids.shape[1] != max_length:
        raise DataError(f"the tokenizer gave sequences of length {ids.shape[1]}, not data.max_length {max_length}")
    return torch.stack([ids, mask, types], 1).long()


def _block_numbers(names: Sequence[str]) -> list[int]:
    found = {int(m.group(1)) for n in names for m in [re.search(r"\.(?:layer|layers|h|block)\.(\d+)\.", n)] if m}
    return sorted(found)


def default_modules(model: nn.Module, last_blocks: int = DEFAULT_LAST_BLOCKS) -> list[str]:
    """The documented default for transformers: the attention (query, key, value, output)
    and MLP (intermediate, output) projections of the last ``last_blocks`` blocks, plus
    the classifier head. Falls back to every Linear when the family is not recognised."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    blocks = _block_numbers(names)
    keep = set(blocks[-last_blocks:]) if last_blocks > 0 else set()
    chosen = []
    for name in names:
        match = re.search(r"\.(?:layer|layers|h|block)\.(\d+)\.(.+)$", name)
        in_block = bool(match) and int(match.group(1)) in keep and match.group(2) in _BLOCK_LINEARS
        is_head = any(fnmatch.fnmatchcase(name.split("model.", 1)[-1], p) for p in _HEAD_PATTERNS)
        if in_block or is_head:
            chosen.append(name)
    return chosen or names
