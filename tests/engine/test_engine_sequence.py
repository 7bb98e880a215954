"""Batches of any shape, and Linear layers on padded sequences, against dense references.

The model takes keyword arguments (input_ids, attention_mask) and returns an object with
``.logits``; the loader yields dict batches. A per-token Linear layer's per-example
gradient is Σ_t g_t a_tᵀ (not rank one) and padded positions must add nothing: the
references run every example alone, cut to its real length.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sequence_reference import (
    reference_factors,
    reference_scores,
    rel_err,
    unpadded_examples,
)
from torch import nn

from influence_cli.engine import (
    covariance_sums,
    fit_factors,
    pairwise_scores,
    self_influence,
)
from influence_cli.engine.batches import position_mask, split_batch
from influence_cli.engine.batching import iterate_indexed_batches
from influence_cli.errors import InfluenceError

pytestmark = pytest.mark.filterwarnings("ignore:influence. parameters of these modules are not tracked")
F64 = torch.float64
TOL = 1e-5


class TokenModel(nn.Module):
    """Embedding → per-token Linear (the sequence layer) → masked mean → Linear head."""

    def __init__(self, vocab: int = 17, width: int = 5, hidden: int = 4, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.proj = nn.Linear(width, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.proj(self.embed(input_ids)))
        keep = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1)
        return SimpleNamespace(logits=self.head(pooled))


def token_data(n: int, length: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 17, (n, length), generator=gen) * mask  # padding id 0
    labels = torch.randint(0, 3, (n,), generator=gen)
    return ids, mask, labels


def dict_batches(ids, mask, labels, size: int):
    return [
        {"input_ids": ids[s : s + size], "attention_mask": mask[s : s + size], "labels": labels[s : s + size],
         "index": torch.arange(s, min(s + size, len(labels)))}
        for s in range(0, len(labels), size)
    ]


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = TokenModel().to(F64).eval()
    ids, mask, labels = token_data(19)
    return model, ids, mask, labels


def test_sequence_factors_match_dense_reference(setup):
    model, ids, mask, labels = setup
    loader = dict_batches(ids, mask, labels, 6)
    names = ["proj", "head"]
    ref = reference_factors(model, unpadded_examples(ids, mask, labels), names)
    sums = covariance_sums(model, loader, fisher="empirical", modules=names)
    cov_a, cov_s = sums.normalised()
    factors = fit_factors(model, loader, "ekfac", fisher="empirical", modules=names, dtype=F64)
    for name in names:
        a_ref, s_ref, grads = ref[name]
        assert rel_err(cov_a[name], a_ref) < TOL
        assert rel_err(cov_s[name], s_ref) < TOL
        layer = factors.layers[name]
        lam_ref = (layer.q_s.T @ grads @ layer.q_a).square().mean(0)
        assert rel_err(layer.eigenvalues, lam_ref) < TOL
    # The proj layer really is rank > 1 per example, and padding really was there.
    assert torch.linalg.matrix_rank(ref["proj"][2][0]) > 1
    assert int(mask.sum()) < mask.numel()
    # Both pass-2 paths (fast per-side rotations, slow explicit G_i) agree.
    slow = fit_factors(model, loader, "ekfac", fisher="empirical", modules=names, dtype=F64, reference=True)
    assert rel_err(slow.layers["proj"].eigenvalues, factors.layers["proj"].eigenvalues) < TOL

    scores = self_influence(model, factors, loader)
    grads_by_layer = {n: ref[n][2] for n in names}
    assert rel_err(scores, reference_scores(factors, grads_by_layer)) < TOL

    test_ids, test_mask, test_labels = token_data(5, seed=3)
    test_ref = reference_factors(model, unpadded_examples(test_ids, test_mask, test_labels), names)
    pair = pairwise_scores(
        model, factors, loader, {"input_ids": test_ids, "attention_mask": test_mask}, test_labels, test_batch_size=2
    )
    expected = reference_scores(factors, grads_by_layer, {n: test_ref[n][2] for n in names})
    assert pair.shape == (5, 19)
    assert rel_err(pair, expected) < TOL


def test_padding_does_not_change_scores(setup):
    """The same examples padded to a longer length give the same factors and scores."""
    model, ids, mask, labels = setup
    pad = torch.zeros(len(ids), 4, dtype=ids.dtype)
    longer = [torch.cat([t, pad], 1) for t in (ids, mask)]
    short = fit_factors(model, dict_batches(ids, mask, labels, 5), "ekfac", fisher="empirical", dtype=F64)
    long = fit_factors(model, dict_batches(*longer, labels, 5), "ekfac", fisher="empirical", dtype=F64)
    for name in short.layers:
        assert rel_err(long.layers[name].eigenvalues, short.layers[name].eigenvalues) < TOL
    a = self_influence(model, short, dict_batches(ids, mask, labels, 5))
    b = self_influence(model, long, dict_batches(*longer, labels, 5))
    assert rel_err(b, a) < TOL


class PackedModel(nn.Module):
    """A model fed one tensor (ids and mask stacked) that names its padding mask."""

    def __init__(self):
        super().__init__()
        self.inner = TokenModel()

    def position_mask(self, packed):
        return packed[:, 1]

    def forward(self, packed):
        return (self.inner(packed[:, 0], packed[:, 1]).logits,)  # a tuple output


def test_packed_tensor_batches_with_position_mask(setup):
    model, ids, mask, labels = setup
    packed_model = PackedModel().to(F64).eval()
    packed_model.inner.load_state_dict(model.state_dict())
    packed = torch.stack([ids, mask], 1)
    tuples = [(packed[s : s + 6], labels[s : s + 6], torch.arange(s, min(s + 6, 19))) for s in range(0, 19, 6)]
    names = ["proj", "head"]
    a = fit_factors(model, dict_batches(ids, mask, labels, 6), "ekfac", fisher="true", modules=names, dtype=F64)
    b = fit_factors(packed_model, tuples, "ekfac", fisher="true", modules=["inner.proj", "inner.head"], dtype=F64)
    for name in names:
        assert rel_err(b.layers[f"inner.{name}"].eigenvalues, a.layers[name].eigenvalues) < TOL
    assert position_mask(packed_model, packed) is not None


def test_batch_shapes_are_read_and_refused_clearly():
    x, y = torch.zeros(3, 2), torch.tensor([0, 1, 0])
    assert split_batch((x, y))[2] is None
    inputs, labels, index = split_batch({"input_ids": x, "label": y, "index": torch.arange(3)})
    assert set(inputs) == {"input_ids"} and labels is y and index.tolist() == [0, 1, 2]
    with pytest.raises(InfluenceError, match="'labels'"):
        split_batch({"input_ids": x})
    with pytest.raises(InfluenceError, match="batch must be"):
        split_batch(x)
    batch = next(iterate_indexed_batches([((x, x), y, torch.arange(3))], torch.device("cpu")))
    assert isinstance(batch[0], tuple) and batch[2].tolist() == [0, 1, 2]
