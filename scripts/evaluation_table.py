#!/usr/bin/env python
"""The README's trust table: LDS and injected-noise detection for every strategy.

    python scripts/evaluation_table.py [-c digits-mlp] [--ensembles 1 3] [--subsets 100]
        [--noise 0.1] [--strategy ekfac ...] [--set key=value ...]

For each ensemble size K it runs `infl evaluate --lds` and `infl evaluate --noise` with
influence.ensemble = K over the strategies (default: identity, diagonal, kfac, ekfac,
exact, lissa) and prints one Markdown row per (K, strategy) plus the training-loss
baseline of the detection, with the wall time of each part (fitting + scoring; the
retrainings are cached in the run directory and reported once).
"""
from __future__ import annotations

import argparse
import time

from influence_cli.config import load_config
from influence_cli.evaluation import evaluate_lds, evaluate_noise_detection
from influence_cli.progress import Reporter

DEFAULT = ["identity", "diagonal", "kfac", "ekfac", "exact", "lissa"]


def seconds(value) -> str:
    if value is None:
        return "—"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def cell(entry: dict, key: str, digits: int = 3) -> str:
    value = entry.get(key)
    return "—" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="digits-mlp")
    parser.add_argument("--strategy", action="append", dest="strategies")
    parser.add_argument("--ensembles", type=int, nargs="*", default=[1, 3])
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    strategies = args.strategies or DEFAULT
    print("| K | ranking | LDS ± stderr | LDS time | AUROC | AP | P@k | R@10% | detection time |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    for k in args.ensembles:
        config = load_config(args.config, [*args.overrides, f"influence.ensemble={k}"])
        start = time.perf_counter()
        lds = evaluate_lds(config, subsets=args.subsets, test_rows=args.test_rows, strategies=strategies, reporter=Reporter())
        noise = evaluate_noise_detection(config, fraction=args.noise, strategies=strategies, reporter=Reporter())
        for name in [*strategies, "loss"]:
            lds_entry = lds["strategies"].get(name, {})
            det = noise["rankings"].get(name, {})
            if "skipped" in lds_entry or "skipped" in det:
                reason = lds_entry.get("skipped") or det.get("skipped")
                print(f"| {k} | {name} | skipped | | | | | | |")
                notes.append(f"K={k} {name}: {reason}")
                continue
            lds_text = f"{lds_entry['mean']:.3f} ± {lds_entry['stderr']:.3f}" if lds_entry else "—"
            lds_time = seconds(lds_entry.get("seconds")) if lds_entry else "—"
            print(
                f"| {k} | {name} | {lds_text} | {lds_time} | {cell(det, 'auroc')} | {cell(det, 'average_precision')} | "
                f"{cell(det, 'precision_at_k')} | {cell(det, 'recall_at_10pct')} | {seconds(det.get('seconds'))} |"
            )
        rt = lds["retraining"]
        notes.append(
            f"K={k}: {lds['subsets']} LDS retrainings ({rt['trained_now']} now, {rt['seconds_total']:.0f} s recorded), "
            f"noisy test accuracy {noise['model']['test_accuracy']:.3f}, whole K={k} pass {time.perf_counter() - start:.0f} s"
        )
    for note in notes:
        print(f"<!-- {note} -->")


if __name__ == "__main__":
    main()
