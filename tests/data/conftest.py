"""Fixtures for the data-layer tests (helpers live in data_helpers.py)."""

from __future__ import annotations

import pytest

from data_helpers import make_config


@pytest.fixture
def cfg(tmp_path):
    """cfg(**data) -> Config with those data fields (and seed=...), paths relative to tmp_path."""

    def build(**data):
        seed = data.pop("seed", 0)
        return make_config(tmp_path, seed=seed, **data)

    return build
