"""A model factory for the fault-injection tests (``model.arch: factory``).

``gated_mlp`` is a small MLP whose forward pass can block at a chosen point, so a test
can deliver SIGINT or SIGKILL to a real ``infl`` process while it is known to be in the
middle of a stage, without depending on how fast the machine is. The gate comes from the
environment (``INFL_TEST_GATE``, JSON), not from the config, so a gated and an ungated run
have the same config and content hashes:

- ``stage``: block in forwards of this kind: "train" (model in training mode),
  "influence" (eval mode with gradients: fitting factors, scoring) or "predict";
- ``after_calls``: let this many such forwards through first (per model instance);
- ``after_file`` / ``count``: only once ``count`` files match this glob;
- ``marker``: written (with the pid) when the forward blocks.

A blocked forward sleeps in short steps (SIGINT interrupts it) for at most 5 minutes.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn


class GatedMLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 16):
        super().__init__()
        width = math.prod(input_shape)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        gate = os.environ.get("INFL_TEST_GATE")
        self._gate = json.loads(gate) if gate else None
        self._calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate is not None:
            self._maybe_block(self._gate)
        return self.net(x)

    def _maybe_block(self, gate: dict) -> None:
        stage = "train" if self.training else ("influence" if torch.is_grad_enabled() else "predict")
        if stage != gate["stage"]:
            return
        if gate.get("after_file") and len(glob.glob(gate["after_file"])) < int(gate.get("count", 1)):
            return
        self._calls += 1
        if self._calls <= int(gate.get("after_calls", 0)):
            return
        Path(gate["marker"]).write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.02)
        raise RuntimeError("fault_model: the test never interrupted the blocked forward")


def gated_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 16) -> nn.Module:
    return GatedMLP(tuple(input_shape), int(num_classes), hidden)
