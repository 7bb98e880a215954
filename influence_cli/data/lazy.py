"""Inputs decoded per example, on demand (``data.in_memory: false``).

Why: an image set bigger than RAM cannot live in one tensor. ``LazyInputs`` stands where
``ExampleSet.inputs`` holds a tensor: ``inputs[i]`` decodes example i (and applies the
standardisation), any other index decodes and stacks the chosen rows (a few rows: model
checks, queries). Batch loaders see that it is not a tensor and go through a torch
DataLoader with ``influence.num_workers`` workers, so memory is bounded by the batch.

Fingerprint (cache keys, stale-factor checks) without decoding everything into memory:
each source hashes what determines its inputs, streaming — image files: every file's
bytes in order plus the decode settings; factory datasets: every decoded input, one at a
time — then the standardisation (mean, std) and the row selection.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

#: data.in_memory: auto decodes lazily when the inputs would take more than this.
IN_MEMORY_LIMIT_BYTES = 1 << 30


class LazyInputs:
    """Rows of a source decoded by ``load(j)`` (j = the source's own row number)."""

    def __init__(
        self,
        load: Callable[[int], torch.Tensor],
        rows: Sequence[int],
        example_shape: tuple[int, ...],
        digest_source: Callable[["hashlib._Hash", Sequence[int]], None],
        mean: Optional[torch.Tensor] = None,
        std: Optional[torch.Tensor] = None,
    ):
        self.load = load
        self.rows = np.asarray(rows, dtype=np.int64)
        self.example_shape = tuple(int(s) for s in example_shape)
        self.digest_source = digest_source
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.example_shape))

    def dim(self) -> int:
        return 1 + len(self.example_shape)

    def one(self, i: int) -> torch.Tensor:
        """Example i as float32, standardised like the in-memory tensor would be."""
        x = torch.as_tensor(self.load(int(self.rows[int(i)])), dtype=torch.float32)
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        return x

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.dim() == 0):
            return self.one(int(key))
        picks = np.arange(len(self.rows))[key.numpy() if isinstance(key, torch.Tensor) else key]
        picks = np.atleast_1d(picks)
        if len(picks) == 0:
            return torch.zeros((0, *self.example_shape), dtype=torch.float32)
        return torch.stack([self.one(int(i)) for i in picks])

    def take(self, indices: Sequence[int]) -> "LazyInputs":
        """A view of the chosen rows (nothing decoded)."""
        return LazyInputs(self.load, self.rows[np.asarray(indices, dtype=np.int64)], self.example_shape,
                          self.digest_source, self.mean, self.std)

    def standardised(self, mean: torch.Tensor, std: torch.Tensor) -> "LazyInputs":
        return LazyInputs(self.load, self.rows, self.example_shape, self.digest_source, mean, std)

    def update_digest(self, digest: "hashlib._Hash") -> None:
        """Hash what the inputs are made of (see the module docstring)."""
        digest.update(f"lazy{self.example_shape}".encode())
        digest.update(self.rows.tobytes())
        for value in (self.mean, self.std):
            if value is not None:
                digest.update(np.ascontiguousarray(value.numpy()).tobytes())
        self.digest_source(digest, self.rows.tolist())


class _Rows(torch.utils.data.Dataset):
    def __init__(self, inputs: LazyInputs):
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.as_tensor(self.inputs.load(int(self.inputs.rows[i])), dtype=torch.float32)


def stream_batches(inputs: LazyInputs, num_workers: int = 0, batch_size: int = 256):
    """Unstandardised float32 batches of the rows, decoded by a DataLoader."""
    return torch.utils.data.DataLoader(_Rows(inputs), batch_size=batch_size, num_workers=num_workers)


def stream_standardisation(inputs: LazyInputs, kind: str, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (images) or per-feature mean/std ``common.standardisation`` gives
    the decoded tensor, in one streaming float64 pass (sum and sum of squares)."""
    total = squares = None
    count = 0
    for batch in stream_batches(inputs, num_workers):
        x = batch.double()
        dims = [0] + list(range(2, x.dim())) if kind == "image" else [0]
        per = x[0].numel() // (x.shape[1] if kind == "image" else x[0].numel())
        s, q = x.sum(dim=dims), (x * x).sum(dim=dims)
        total = s if total is None else total + s
        squares = q if squares is None else squares + q
        count += len(x) * per
    assert total is not None and squares is not None
    mean = total / count
    var = torch.clamp(squares / count - mean * mean, min=0.0)
    std = var.sqrt() if len(inputs) > 1 else torch.ones_like(mean)
    std = torch.where(std > 1e-8 * torch.clamp(mean.abs(), min=1.0), std, torch.ones_like(std))
    shape = (len(mean),) + (1,) * (len(inputs.example_shape) - 1) if kind == "image" else inputs.example_shape
    return mean.reshape(shape).float(), std.reshape(shape).float()


def hash_files(files: Sequence[Any], settings: str) -> Callable[["hashlib._Hash", Sequence[int]], None]:
    """digest_source for file-backed rows: the settings, then each row's file bytes."""

    def digest_source(digest: "hashlib._Hash", rows: Sequence[int]) -> None:
        digest.update(settings.encode())
        for j in rows:
            with open(files[j], "rb") as handle:
                digest.update(b"\0file\0")
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)

    return digest_source
