"""Tiny float64 models and data shared by the engine tests."""

from __future__ import annotations

import torch
from torch import nn


class SeqModel(nn.Module):
    """A Linear applied to every position of a (N, L, d) sequence, then pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)).mean(1))


class SharedModel(nn.Module):
    """One Linear called twice in a forward pass (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)
    )


def make_cnn() -> nn.Module:
    # conv1: P=36, d_in=19, d_out=3; conv2: P=9, d_in=27, d_out=4; fc: 37 → 3.
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(36, 3),
    )


class BranchCNN(nn.Module):
    """Convs covering every branch of the per-side flop rule (input 3x4x4).

    c1: P=16, d_in=28, d_out=4 -> A after contraction, S per position.
    c2: P=4, d_in=4, d_out=8  -> A per position, S after contraction.
    c3: P=4, d_in=5, d_out=8  -> both per position.
    c4: P=16, d_in=4, d_out=2 -> both after contraction.
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(1, 8, 2, stride=2, bias=False)
        self.c3 = nn.Conv2d(1, 8, 2, stride=2)
        self.c4 = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(96, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))
        m = h.mean(1, keepdim=True)
        parts = [torch.tanh(self.c2(m)), torch.tanh(self.c3(m)), torch.tanh(self.c4(x))]
        return self.fc(torch.cat([p.flatten(1) for p in parts], 1))


def make_branch_cnn() -> nn.Module:
    return BranchCNN()


def seeded(fn, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fn().double()


def make_data(shape: tuple[int, ...], n: int, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, size: int):
    """A list-of-batches loader with an extra ignored item, ragged last batch."""
    return [(x[i : i + size], y[i : i + size], torch.arange(i, min(i + size, len(x)))) for i in range(0, len(x), size)]
