"""Content fingerprints of the data a run actually used.

Why: cached checkpoints and factors are only valid for the data they were made from. The
config names *where* the data lives, not what it holds, so an edited label or an added row
must change a key of its own. The fingerprint hashes what the model sees after every
common step (limit, label noise, standardisation): ids, labels, inputs and class names.
SHA-256 runs at about 1.4 GB/s here, so even a 600 MB split costs well under a second,
paid once per command. Inputs decoded lazily (data.in_memory: false) hash their source
instead, streaming (see data/lazy.py).
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch


def _update_tensor(digest: "hashlib._Hash", tensor: torch.Tensor) -> None:
    array = np.ascontiguousarray(tensor.detach().cpu().numpy())
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))


def fingerprint_split(inputs: Any, labels: torch.Tensor, ids: Sequence[str], class_names: Sequence[str]) -> str:
    """A 16-hex-digit hash of one split: inputs, labels, ids (in order) and class names."""
    digest = hashlib.sha256()
    digest.update(b"infl-split-v1\0")
    digest.update("\0".join(str(c) for c in class_names).encode("utf-8") + b"\1")
    digest.update("\0".join(str(i) for i in ids).encode("utf-8", "surrogateescape") + b"\1")
    _update_tensor(digest, labels)
    if hasattr(inputs, "update_digest"):  # LazyInputs: streamed from what the inputs are made of
        inputs.update_digest(digest)
    else:
        _update_tensor(digest, inputs)
    return digest.hexdigest()[:16]


def describe_change(old: dict | None, new: dict) -> str:
    """Say in words what differs between two ``{"examples", "classes", ...}`` summaries."""
    if not old:
        return "the stored outputs predate data fingerprints"
    parts = []
    if old.get("examples") != new.get("examples"):
        parts.append(f"{old.get('examples')} → {new.get('examples')} training examples")
    if old.get("classes") != new.get("classes"):
        parts.append(f"classes {old.get('classes')} → {new.get('classes')}")
    detail = "; ".join(parts) if parts else "labels or inputs edited"
    return f"the training data changed ({detail})"
