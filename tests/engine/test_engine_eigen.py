"""Eigendecompositions of the covariances, with the exact-zero rows split off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import influence_cli.engine.eigen as eigen
from influence_cli.engine import fit_factors, precondition
from engine_helpers import batches, make_data, seeded

F64 = torch.float64


def psd_with_zero_rows(d: int, zero: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * d, d, generator=g, dtype=F64)
    x[:, zero] = 0.0
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("zero", [[], [0], [1, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]])
def test_eigh_psd_is_an_exact_eigendecomposition(zero):
    mat = psd_with_zero_rows(8, zero)
    evals, evecs = eigen.eigh_psd(mat)
    assert evecs.shape == (8, 8) and evals.dtype == F64
    assert torch.allclose(evecs.T @ evecs, torch.eye(8, dtype=F64), atol=1e-12)
    assert torch.allclose(evecs @ torch.diag(evals) @ evecs.T, mat, atol=1e-12)
    reference = torch.linalg.eigvalsh(mat).clamp(min=0.0)
    assert torch.allclose(evals, reference, atol=1e-12)
    assert bool((evals[1:] >= evals[:-1]).all())  # ascending, like torch.linalg.eigh


class OnePixelConv(nn.Module):
    """A 3×3 convolution with padding 1 on a 1×1 map: 8 of its 9 taps only see padding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def full_eigh(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mat = mat.to(F64)
    evals, evecs = torch.linalg.eigh(0.5 * (mat + mat.T))
    return evals.clamp_(min=0.0), evecs


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_split_off_zero_rows_give_the_same_preconditioner(monkeypatch, strategy):
    model = seeded(OnePixelConv)
    x, y = make_data((3, 1, 1), 20)
    kept: list[int] = []
    trim = eigen.eigh_psd

    def spy(mat):
        kept.append(int((torch.diagonal(mat) != 0).sum()))
        return trim(mat)

    def fit():
        return fit_factors(model, batches(x, y, 8), strategy, dtype=F64, fisher="empirical", damping=0.01)

    monkeypatch.setattr(eigen, "eigh_psd", spy)
    trimmed = fit()
    # conv's A is 28 wide (27 taps + bias); only the centre tap of each channel and the bias
    # ever see data, so the trimmed path really ran on it
    assert 3 + 1 in kept
    monkeypatch.setattr(eigen, "eigh_psd", full_eigh)
    dense = fit()
    g = torch.Generator().manual_seed(3)
    for name, layer in trimmed.layers.items():
        grads = torch.randn(5, layer.d_out, layer.d_in, dtype=F64, generator=g)
        fast, slow = precondition(layer, grads), precondition(dense.layers[name], grads)
        assert torch.allclose(fast, slow, rtol=1e-9, atol=1e-12), name
