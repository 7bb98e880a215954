"""The whole audit with images decoded per batch (data.in_memory: false, DataLoader
workers) equals the in-memory audit: same checkpoint, factors and ranking."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from influence_cli.app.scores import run_self_influence
from influence_cli.app.session import Session
from influence_cli.config import config_from_dict
from influence_cli.data.lazy import LazyInputs
from influence_cli.progress import Reporter


def test_lazy_audit_equals_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "imgs" / f"k{c}").mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(rng.normal(60 * c + 50, 30, size=(8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / f"k{c}" / f"{i}.png")
    tables = {}
    for in_memory, workers in ((True, 0), (False, 1)):
        config = config_from_dict({
            "name": f"run-{in_memory}", "data": {"source": "image_folder", "path": str(tmp_path / "imgs"), "in_memory": in_memory},
            "model": {"arch": "cnn", "channels": [4]}, "train": {"epochs": 2, "batch_size": 8},
            "influence": {"batch_size": 7, "num_workers": workers}, "output": {"dir": str(tmp_path / "runs")},
        })
        session = Session(config, Reporter())
        result = run_self_influence(session)
        assert isinstance(session.data().train.inputs, LazyInputs) == (not in_memory)
        tables[in_memory] = result.table
    pd.testing.assert_frame_equal(tables[True], tables[False])
