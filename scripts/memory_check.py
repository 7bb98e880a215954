#!/usr/bin/env python
"""Peak memory per stage: the docs/memory.md formula against a measured peak RSS.

    python scripts/memory_check.py [--workload mlp784|cnn32|all]

Layer sizes (P positions, d_in with the bias column, d_out) and per-example forward
activation sizes are read from the model with hooks; each stage runs in its own process
(scripts/benchmark.py); the kernel's peak-RSS mark is reset just before the stage
(/proc/self/clear_refs), and the stage's peak minus the RSS at that moment is compared
with the formula.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import benchmark  # noqa: E402

MB = 1024 * 1024
F32 = 4
CACHE_BYTES = 512 * MB
CHUNK = 24 * 1024 * 1024  # precondition._CHUNK_ELEMENTS
PAIR = 4 * 1024 * 1024  # scores._PAIR_ELEMENTS


def layer_sizes(model: nn.Module, example: torch.Tensor):
    """[(kind, P, d_in, d_out)] of tracked layers, and forward activation elements/example."""
    layers, acts = [], [0]

    def hook(module, args, out):
        acts[0] += out[0].numel() if isinstance(out, torch.Tensor) else 0
        if isinstance(module, nn.Conv2d):
            p = out.shape[2] * out.shape[3]
            d_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1] + (module.bias is not None)
            layers.append(("conv", p, d_in, module.out_channels))
        elif isinstance(module, nn.Linear):
            layers.append(("linear", 1, module.in_features + (module.bias is not None), module.out_features))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(example[:1])
    for h in handles:
        h.remove()
    return layers, acts[0]


def formulas(layers, acts, n: int, b: int, t: int) -> dict[str, float]:
    """Bytes per stage beyond the baseline (see docs/memory.md)."""
    capture = sum(p * (i + o) for _k, p, i, o in layers)  # a and g per example
    patches = sum(p * i for k, p, i, _o in layers if k == "conv")  # unfold + reordered copy
    per_batch = F32 * b * (capture + patches + 2 * acts)
    kron = 8 * sum(i * i + o * o for _k, _p, i, o in layers)  # float64 A, S (+ eigh copies)
    cache = F32 * n * capture
    cache = cache if cache <= CACHE_BYTES else 0
    chunk = max(
        [F32 * 3 * min(b, max(1, CHUNK // (2 * o * i))) * o * i for k, _p, i, o in layers if k == "conv"] or [0]
    )
    # Loaded factors (Q_S, Q_A, Λ) plus the operators' transposed copies and 1/(Λ+λ) twice.
    factors = F32 * sum(3 * (i * i + o * o) + 3 * o * i for _k, _p, i, o in layers)
    # Preconditioned test gradients T × Σ d_out·d_in, twice while the per-batch parts are concatenated.
    test_side = 2 * F32 * t * sum(o * i for _k, _p, i, o in layers)
    return {
        "fit-factors": per_batch + 3 * kron + cache + chunk,
        "self-influence": per_batch + factors + chunk + F32 * n,
        "score-top10": per_batch + factors + test_side + F32 * PAIR + chunk,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="all", choices=[*benchmark.WORKLOADS, "all"])
    args = parser.parse_args()
    names = list(benchmark.WORKLOADS) if args.workload == "all" else [args.workload]
    print(f"{'workload':9} {'stage':15} {'formula MB':>10} {'measured MB':>11} {'ratio':>6}   (measured = the stage's peak RSS - RSS just before it)")
    with tempfile.TemporaryDirectory(prefix="infl-mem-") as tmp:
        directory = Path(tmp)
        for name in names:
            w = benchmark.WORKLOADS[name]
            benchmark.prepare(w, directory)
            model, blob = benchmark.load(w, directory)
            layers, acts = layer_sizes(model, blob["x"])
            predicted = formulas(layers, acts, len(blob["x"]), w.batch_size, len(blob["xt"]))
            base = benchmark.measure("baseline", w, directory)
            print(f"{name:9} {'baseline':15} {'':>10} {base['rss_before_mb']:>11.0f}          "
                  "(RSS before a stage: torch + data + model + one warm batch)")
            benchmark.measure("fit-factors", w, directory)  # factors for the later stages
            for stage, value in predicted.items():
                res = benchmark.measure(stage, w, directory)
                rss = res["stage_peak_mb"] - res["rss_before_mb"]
                print(f"{name:9} {stage:15} {value / MB:>10.0f} {rss:>11.0f} {rss / (value / MB):>6.2f}"
                      f"   (whole-process peak {res['max_rss_mb']:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
