"""The containers every source produces: ExampleSet (one split), Datasets, LabelNoise.

All inputs live in one float32 tensor (``ExampleSet.inputs``) so batch loaders can slice
it directly, or, with ``data.in_memory: false``, in a ``lazy.LazyInputs`` that decodes an
example when it is indexed (batch loaders then go through a DataLoader). Standardisation is stored as (mean, std) so ``display`` can undo it and show
natural values (uint8 pixels, raw table values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
import torch

Kind = Literal["image", "table", "vector"]
DisplayItem = Union[np.ndarray, dict[str, Any]]


def _as_index(indices: Any) -> torch.Tensor:
    if isinstance(indices, torch.Tensor):
        idx = indices
    elif isinstance(indices, np.ndarray):
        idx = torch.from_numpy(np.ascontiguousarray(indices))
    else:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
    if idx.dtype == torch.bool:
        idx = idx.nonzero().flatten()
    return idx.to(torch.long).reshape(-1)


@dataclass(eq=False, repr=False)
class ExampleSet(torch.utils.data.Dataset):
    """One split.

    ``__getitem__(i)`` returns ``(x, y, i)``: x a float32 tensor of the input shape, y an
    int64 scalar tensor, i the int index within this set.

    ``ids`` are stable identifiers: the relative file path for image_folder/csv_manifest,
    the 0-based row number (as str) of the source table or built-in split otherwise (or the
    table's id column when data.id_column is set).
    """

    inputs: Any  # (N, *input_shape) float32 tensor (or LazyInputs), standardised when data.standardize
    labels: torch.Tensor  # (N,) int64 (task: regression: float32); the labels used for training (noisy for train)
    ids: list[str]
    kind: Optional[str] = None  # "image" | "table" | "vector"; inferred from inputs when None
    feature_names: Optional[list[str]] = None  # tables/vectors: one name per feature
    mean: Optional[torch.Tensor] = None  # standardisation, broadcastable to one example
    std: Optional[torch.Tensor] = None
    pixel_scale: Optional[float] = 255.0  # images: natural pixel = unstandardised * scale; None: min-max per image
    raw: Optional[np.ndarray] = field(default=None)  # exact natural values for display (tables), (N, F)

    def __post_init__(self) -> None:
        from .lazy import LazyInputs

        if not isinstance(self.inputs, LazyInputs):
            self.inputs = torch.as_tensor(self.inputs, dtype=torch.float32)
        labels = torch.as_tensor(self.labels)
        self.labels = (labels.float() if labels.is_floating_point() else labels.long()).reshape(-1)
        self.ids = [str(i) for i in self.ids]
        if not (len(self.inputs) == len(self.labels) == len(self.ids)):
            raise ValueError(
                f"ExampleSet: inputs ({len(self.inputs)}), labels ({len(self.labels)}) and ids ({len(self.ids)}) differ in length"
            )
        if self.kind is None:
            self.kind = "image" if self.inputs.dim() == 4 else "vector"

    # -- torch Dataset -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        i = int(i)
        return self.inputs[i], self.labels[i], i

    def __repr__(self) -> str:
        return f"ExampleSet(kind={self.kind!r}, n={len(self)}, input_shape={self.input_shape})"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    # -- helpers ---------------------------------------------------------------------
    def natural(self, i: int) -> torch.Tensor:
        """Input i with standardisation undone (float32)."""
        x = self.inputs[int(i)]
        if self.std is not None:
            x = x * self.std
        if self.mean is not None:
            x = x + self.mean
        return x

    def display(self, i: int) -> DisplayItem:
        """Natural values of example i: an uint8 (H, W) / (H, W, 3) image or {feature: value}."""
        i = int(i)
        if self.kind == "image":
            x = self.natural(i).double().numpy()
            if self.pixel_scale is not None:
                x = x * self.pixel_scale
            else:
                lo, hi = float(x.min()), float(x.max())
                x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
            img = np.clip(np.rint(x), 0, 255).astype(np.uint8)  # (C, H, W)
            if img.shape[0] == 3:
                return np.ascontiguousarray(img.transpose(1, 2, 0))
            if img.shape[0] == 1:
                return img[0]
            return np.clip(np.rint(img.mean(axis=0)), 0, 255).astype(np.uint8)
        if self.raw is not None:
            values = self.raw[i].tolist()
        else:
            values = self.natural(i).reshape(-1).tolist()
        names = self.feature_names or [f"x{j}" for j in range(len(values))]
        return dict(zip(names, values))

    def subset(self, indices: Union[Sequence[int], torch.Tensor, np.ndarray]) -> "ExampleSet":
        """A new set with the chosen examples in the given order; ids, labels and scaling kept."""
        idx = _as_index(indices)
        idx_list = idx.tolist()
        lazy = not isinstance(self.inputs, torch.Tensor)  # LazyInputs: a view, nothing decoded
        return ExampleSet(
            inputs=self.inputs.take(idx_list) if lazy else self.inputs[idx],
            labels=self.labels[idx],
            ids=[self.ids[j] for j in idx_list],
            kind=self.kind,
            feature_names=self.feature_names,
            mean=self.mean,
            std=self.std,
            pixel_scale=self.pixel_scale,
            raw=None if self.raw is None else self.raw[np.asarray(idx_list, dtype=np.int64)],
        )


@dataclass(eq=False)
class LabelNoise:
    """Which training labels were flipped on purpose (data.label_noise)."""

    flipped: torch.Tensor  # (N_train,) bool
    original_labels: torch.Tensor  # (N_train,) int64
    fraction: float
    kind: str
    seed: int


@dataclass(eq=False)
class Datasets:
    train: ExampleSet
    test: ExampleSet
    class_names: list[str]  # index = integer label
    input_shape: tuple[int, ...]  # (C, H, W) for images, (F,) for tables/vectors
    kind: str  # "image" | "table" | "vector"
    noise: Optional[LabelNoise] = None
    _fingerprints: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self, split: str = "train") -> str:
        """Content hash of one split as the model sees it (computed once, then cached)."""
        if split not in self._fingerprints:
            from .fingerprint import fingerprint_split

            part = self.train if split == "train" else self.test
            self._fingerprints[split] = fingerprint_split(part.inputs, part.labels, part.ids, self.class_names)
        return self._fingerprints[split]

    def data_identity(self) -> dict[str, Any]:
        """What cached outputs record about the training data: its fingerprint and size."""
        return {"fingerprint": self.fingerprint("train"), "examples": len(self.train), "classes": len(self.class_names)}


@dataclass(eq=False)
class SourceData:
    """What a source builder returns, before limit/noise/standardisation."""

    train_x: Any  # a tensor, or LazyInputs (data.in_memory: false)
    train_y: torch.Tensor
    train_ids: list[str]
    test_x: Any
    test_y: torch.Tensor
    test_ids: list[str]
    class_names: list[str]
    kind: str
    feature_names: Optional[list[str]] = None
    pixel_scale: Optional[float] = 255.0
    train_raw: Optional[np.ndarray] = None
    test_raw: Optional[np.ndarray] = None
    standardize: bool = True  # False: data.standardize does not apply (factory Datasets)
