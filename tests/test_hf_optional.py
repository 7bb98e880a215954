"""The Hugging Face extra stays optional: the core never imports transformers/datasets."""

from __future__ import annotations

import subprocess
import sys


def test_core_does_not_import_transformers():
    code = (
        "import sys\n"
        "import influence_cli.cli, influence_cli.app.model, influence_cli.app.scores, influence_cli.data\n"
        "import influence_cli.engine, influence_cli.engine.batches, influence_cli.models, influence_cli.training\n"
        "from influence_cli.config import config_from_dict\n"
        "from influence_cli.data import build_datasets\n"
        "build_datasets(config_from_dict({'name': 'x'}))\n"
        "bad = [m for m in ('transformers', 'datasets', 'influence_cli.hf') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
