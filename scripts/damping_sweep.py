#!/usr/bin/env python
"""How the damping changes LDS and noise detection: the study behind the default.

    python scripts/damping_sweep.py [-c digits-mlp] [--strategy ekfac --strategy kfac]
        [--factors 0.001 0.01 0.1 1 10] [--absolute 1e-4 1e-3] [--subsets 100] [--noise 0.1]

For every damping setting it runs `infl evaluate --lds` (the retrainings are cached in the
run directory, so they are trained once for the whole sweep) and `infl evaluate --noise`
(the noisy model is trained once too), and prints one Markdown table: LDS mean ± stderr
and detection AP / AUROC per strategy and setting. ``--factors`` are relative settings
(damping: auto with influence.damping_factor = f, i.e. f x the mean eigenvalue per
layer); ``--absolute`` are fixed numbers for every layer.
"""
from __future__ import annotations

import argparse
import time

from influence_cli.config import load_config
from influence_cli.evaluation import evaluate_lds, evaluate_noise_detection
from influence_cli.progress import Reporter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="digits-mlp")
    parser.add_argument("--strategy", action="append", dest="strategies")
    parser.add_argument("--factors", type=float, nargs="*", default=[0.001, 0.01, 0.1, 1.0, 10.0])
    parser.add_argument("--absolute", type=float, nargs="*", default=[])
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    strategies = args.strategies or ["ekfac", "kfac"]
    settings = [("auto", f) for f in args.factors] + [(a, 0.1) for a in args.absolute]
    print("| damping | strategy | LDS (mean ± stderr) | detection AP | detection AUROC |")
    print("|---|---|---:|---:|---:|")
    for damping, factor in settings:
        label = f"auto × {factor:g}" if damping == "auto" else f"{damping:g}"
        overrides = [*args.overrides, f"influence.damping={damping}", f"influence.damping_factor={factor}"]
        config = load_config(args.config, overrides)
        start = time.perf_counter()
        lds = evaluate_lds(config, subsets=args.subsets, test_rows=args.test_rows, strategies=strategies, reporter=Reporter())
        noise = evaluate_noise_detection(config, fraction=args.noise, strategies=strategies, reporter=Reporter())
        for name in strategies:
            entry, det = lds["strategies"][name], noise["rankings"][name]
            if "skipped" in entry or "skipped" in det:
                print(f"| {label} | {name} | skipped | | |")
                continue
            print(
                f"| {label} | {name} | {entry['mean']:.3f} ± {entry['stderr']:.3f} | "
                f"{det['average_precision']:.3f} | {det['auroc']:.3f} |"
            )
        print(f"<!-- {label}: {time.perf_counter() - start:.1f} s -->", flush=True)


if __name__ == "__main__":
    main()
