"""Hugging Face tests: skipped when the optional extra (transformers) is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))  # sequence_reference
