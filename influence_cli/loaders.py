"""Re-iterable batch loaders over an ExampleSet.

The influence engine makes several passes over the data, so loaders must be iterable more
than once and give the same order each time. Tensor-backed sets are sliced directly (much
faster than collating single items); other sets go through a torch DataLoader.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset


class BatchLoader:
    """Yields ``(inputs, labels, indices)`` batches; re-iterable, deterministic order."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        indices: Optional[torch.Tensor] = None,
        num_workers: int = 0,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.indices = indices if indices is not None else torch.arange(len(dataset))  # type: ignore[arg-type]
        self._epoch = 0

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    @property
    def num_examples(self) -> int:
        return len(self.indices)

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return self.indices
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self._epoch)
        self._epoch += 1
        return self.indices[torch.randperm(len(self.indices), generator=generator)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self._order()
        inputs = getattr(self.dataset, "inputs", None)
        labels = getattr(self.dataset, "labels", None)
        if isinstance(inputs, torch.Tensor) and isinstance(labels, torch.Tensor):
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                yield inputs[idx], labels[idx], idx
            return
        loader = DataLoader(
            torch.utils.data.Subset(self.dataset, order.tolist()),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )
        for batch in loader:
            x, y, idx = batch[0], batch[1], batch[2]
            yield x, torch.as_tensor(y), torch.as_tensor(idx)
