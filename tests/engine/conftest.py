"""Fixtures for the engine tests (float64 tiny models)."""

from __future__ import annotations

import pytest

from engine_helpers import make_cnn, make_data, make_mlp, seeded


@pytest.fixture
def mlp_setup():
    model = seeded(make_mlp)
    x, y = make_data((6,), 22)
    return model, x, y


@pytest.fixture
def cnn_setup():
    model = seeded(make_cnn)
    x, y = make_data((2, 6, 6), 14)
    return model, x, y
