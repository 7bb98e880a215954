"""Counter-based random numbers for true-Fisher label sampling.

A label drawn for an example depends only on (seed, example index, class), never on the
batch it arrives in, the loader order, the process or the ``--shard`` job, so every
fitting pass, batching and sharding of the same data sees the same labels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["sample_fisher_labels", "splitmix64"]

_MASK64 = (1 << 64) - 1


def splitmix64(x):
    """SplitMix64 finaliser of uint64 numpy values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_fisher_labels(probs: Tensor, seed: int, index: Tensor) -> Tensor:
    """One label per row drawn from ``probs`` (n, C), keyed by (seed, example index).

    Exponential race: label = argmax_c p_c / E_c with E_c = −log u_c and u_c a
    counter-based uniform of (seed, index, c). So an example gets the same label whatever
    the batch size, loader order or shard it is seen in (single process, torchrun ranks
    and --shard jobs agree), and both fitting passes see the same labels.
    """
    n, classes = probs.shape
    idx = index.cpu().numpy().astype(np.uint64)
    key = splitmix64(np.uint64(int(seed) & _MASK64))
    with np.errstate(over="ignore"):
        counter = idx[:, None] * np.uint64(classes) + np.arange(classes, dtype=np.uint64)[None, :]
        bits = splitmix64(counter ^ key)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (2.0**-53)
    race = probs.detach().cpu().to(torch.float64) / torch.from_numpy(-np.log(u))
    return race.argmax(1)
