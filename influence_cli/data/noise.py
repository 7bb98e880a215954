"""Label-noise injection, to evaluate how well self-influence finds mislabelled examples."""

from __future__ import annotations

from typing import Any

import torch

from influence_cli.errors import DataError

NOISE_KINDS = ("uniform", "class_conditional")


def class_derangement(num_classes: int, seed: int) -> torch.Tensor:
    """A seeded permutation of the classes with no fixed point: class c -> mapping[c] != c."""
    if num_classes < 2:
        raise DataError("data.label_noise: needs at least 2 classes to flip labels; set data.label_noise.fraction: 0")
    generator = torch.Generator().manual_seed(int(seed) + 7919)  # independent of the example draw
    while True:  # about e (~2.7) tries on average
        perm = torch.randperm(num_classes, generator=generator)
        if not bool((perm == torch.arange(num_classes)).any()):
            return perm


def inject_label_noise(
    labels: Any, num_classes: int, fraction: float, kind: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly ``round(fraction * N)`` labels, each to a different class.

    ``uniform``: each chosen label goes to a random other class. ``class_conditional``:
    class c always goes to the same other class (a seeded derangement), a systematic
    confusion. Returns ``(new_labels, flipped_mask)``; the input is not modified.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    n = len(labels)
    if not 0.0 <= float(fraction) <= 1.0:
        raise DataError(f"data.label_noise.fraction: {fraction} is outside [0, 1]; use a fraction such as 0.1")
    if kind not in NOISE_KINDS:
        raise DataError(f"data.label_noise.kind: unknown kind '{kind}'; use uniform or class_conditional")
    new = labels.clone()
    flipped = torch.zeros(n, dtype=torch.bool)
    count = int(round(float(fraction) * n))
    if count == 0:
        return new, flipped
    if num_classes < 2:
        raise DataError("data.label_noise: needs at least 2 classes to flip labels; set data.label_noise.fraction: 0")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"data.label_noise: labels must lie in 0..{num_classes - 1} to be flipped")
    generator = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(n, generator=generator)[:count]
    if kind == "uniform":
        offset = torch.randint(1, num_classes, (count,), generator=generator)
        new[chosen] = (labels[chosen] + offset) % num_classes
    else:
        mapping = class_derangement(num_classes, seed)
        new[chosen] = mapping[labels[chosen]]
    flipped[chosen] = True
    return new, flipped
