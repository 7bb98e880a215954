"""Tracked-module selection and the capture of per-example (a, g)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from influence_cli.errors import InfluenceError
from influence_cli.engine import ActivationCapture, select_modules
from influence_cli.engine.kernels import per_example_grads
from influence_cli.engine.reference import per_example_gradients
from influence_cli.engine.tracked import eval_mode, to_weight_order
from engine_helpers import (
    SeqModel,
    SharedModel,
    make_branch_cnn,
    make_cnn,
    make_data,
    make_mlp,
    seeded,
)


def captured_grads(model, x, y, modules=None):
    modules = modules or select_modules(model)
    with eval_mode(model), ActivationCapture(modules) as cap:
        logits = cap.forward(model, x)
        layers = cap.gradients(F.cross_entropy(logits, y, reduction="sum"))
    return {
        name: to_weight_order(per_example_grads(b.a, b.g), b.perm) for name, b in layers.items()
    }, layers


@pytest.mark.parametrize(
    "factory, shape",
    [
        (make_mlp, (6,)),  # Linear with and without bias, ReLU(inplace=True)
        (make_cnn, (2, 6, 6)),  # Conv2d with padding, stride 2, no bias
        (make_branch_cnn, (3, 4, 4)),
        (SeqModel, (7, 5)),  # Linear on (N, L, d)
        (SharedModel, (4,)),  # one Linear called twice
    ],
)
def test_capture_matches_torch_func(factory, shape):
    model = seeded(factory)
    x, y = make_data(shape, 9)
    fast, _ = captured_grads(model, x, y)
    ref = per_example_gradients(model, list(fast), x, y)
    assert set(fast) == set(ref)
    for name in ref:
        assert fast[name].shape == ref[name].shape, name
        assert ref[name].abs().max() > 1e-6, name  # non-trivial
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-10, atol=1e-12)


def test_capture_shapes_and_bias_column():
    model = seeded(make_cnn)
    x, y = make_data((2, 6, 6), 4)
    _, layers = captured_grads(model, x, y)
    a, g = layers["0"].a, layers["0"].g
    assert a.shape == (4, 36, 19) and g.shape == (4, 36, 3)
    assert torch.all(a[:, :, -1] == 1.0)  # bias folded in as the last input column
    a2 = layers["2"].a
    assert a2.shape == (4, 9, 27)  # no bias: no ones column
    seq = seeded(SeqModel)
    xs, ys = make_data((7, 5), 3)
    _, seq_layers = captured_grads(seq, xs, ys)
    assert seq_layers["proj"].a.shape == (3, 7, 6)
    assert seq_layers["head"].a.shape == (3, 1, 5)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize(
    "conv, flat",
    [
        (lambda: nn.Conv2d(2, 3, (2, 3), padding="same"), 48),  # asymmetric implicit padding
        (lambda: nn.Conv2d(2, 3, 3, padding="valid"), 12),
        (lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), 36),
    ],
)
def test_conv_variants_match_reference(conv, flat):
    torch.manual_seed(0)
    model = nn.Sequential(conv(), nn.Tanh(), nn.Flatten(), nn.Linear(flat, 3)).double()
    x, y = make_data((2, 4, 4), 5)
    fast, _ = captured_grads(model, x, y)
    ref = per_example_gradients(model, list(fast), x, y)
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-10, atol=1e-12)


def test_select_modules_patterns_and_subclasses():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert list(select_modules(model)) == ["0", "2"]
    assert list(select_modules(model, ["2"])) == ["2"]
    assert list(select_modules(model, ["*"])) == ["0", "2"]


def test_select_modules_warns_about_untracked_parameters():
    model = nn.Sequential(
        nn.Embedding(5, 4),
        nn.Linear(4, 4),
        nn.BatchNorm1d(4),
        nn.Conv2d(4, 4, 1, groups=2),
        nn.Conv2d(4, 4, 1, padding_mode="reflect"),
    )
    with pytest.warns(UserWarning) as record:
        tracked = select_modules(model)
    assert list(tracked) == ["1"]
    assert len(record) == 1
    message = str(record[0].message)
    for name in ("0 (Embedding)", "2 (BatchNorm1d)", "3 (Conv2d, groups=2)", "4 (Conv2d, padding_mode='reflect')"):
        assert name in message


def test_no_warning_when_everything_is_tracked():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select_modules(seeded(make_mlp))


def test_nothing_tracked_raises():
    with pytest.raises(InfluenceError, match="nothing to track"):
        select_modules(nn.Sequential(nn.ReLU(), nn.Tanh()))
    with pytest.raises(InfluenceError, match="no Linear/Conv2d module matches"):
        select_modules(seeded(make_mlp), ["encoder.*"])


def test_hook_that_never_fires_is_named():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            out, _ = self.attn(x, x, x)
            return self.head(out.mean(1))

    model = Attn().double()
    x, y = make_data((3, 4), 2)
    with pytest.warns(UserWarning):
        modules = select_modules(model)
    assert "attn.out_proj" in modules
    with pytest.raises(InfluenceError, match=r"attn\.out_proj.*influence\.modules"):
        captured_grads(model, x, y, modules)


def test_eval_mode_is_restored():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2)).double()
    model.train()
    model[1].eval()
    x, y = make_data((3,), 4, classes=2)
    captured_grads(model, x, y)
    assert model.training and model[0].training and not model[1].training


def test_dropout_is_off_during_capture():
    model = seeded(lambda: nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.9), nn.Linear(8, 3)))
    model.train()
    x, y = make_data((6,), 5)
    first, _ = captured_grads(model, x, y)
    second, _ = captured_grads(model, x, y)
    for name in first:
        torch.testing.assert_close(first[name], second[name])


def test_non_finite_activations_name_the_layer():
    model = seeded(make_mlp)
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    x, y = make_data((6,), 4)
    with pytest.raises(InfluenceError, match=r"'2'"):
        captured_grads(model, x, y)


def test_non_batch_first_layer_is_rejected():
    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):  # (N, L, d) -> (L, N, d) before the Linear
            return self.lin(x.transpose(0, 1)).mean(0)

    model = Transposed().double()
    x, y = make_data((5, 4), 2)
    with pytest.raises(InfluenceError, match="batch"):
        captured_grads(model, x, y)
