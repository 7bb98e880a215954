#!/usr/bin/env python
"""Detection of injected label noise: self-influence ranking vs training-loss ranking.

    python scripts/noise_quality.py digits-mlp digits-cnn [--fraction 0.1]

Flips the given fraction of training labels (uniform, seeded), trains, ranks by ekfac
self-influence and by training loss on the same model, and prints AUROC, average precision
and the share of flipped labels found in the top 10 % of each ranking, plus how the default
flagging rule does. Runs go to /tmp/infl-noise-quality.
"""
import argparse
import time

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from influence_cli.config import load_config
from influence_cli.app import Session, run_self_influence
from influence_cli.progress import Reporter

parser = argparse.ArgumentParser()
parser.add_argument("configs", nargs="+")
parser.add_argument("--fraction", type=float, default=0.1)
args = parser.parse_args()
print("| config | test acc | ranking | AUROC | AP | flipped in top 10 % | flagged (precision / recall) |")
print("|---|---:|---|---:|---:|---:|---|")
for name in args.configs:
    cfg = load_config(name, [f"data.label_noise.fraction={args.fraction}", f"name={name}-noise", "output.dir=/tmp/infl-noise-quality"])
    session = Session(cfg, Reporter())
    start = time.time()
    result = run_self_influence(session)
    flipped = session.data().noise.flipped.numpy()
    table = result.table.sort_values("index")
    flagged = table.flagged.to_numpy()
    k = int(round(0.1 * len(table)))
    for label, score in (("ekfac self-influence", table.self_influence.to_numpy()), ("training loss", table.loss.to_numpy())):
        top = flipped[np.argsort(-score, kind="stable")[:k]].sum() / flipped.sum()
        flag_text = ""
        if label.startswith("ekfac"):
            precision = flipped[flagged].mean() if flagged.sum() else 0.0
            flag_text = f"{flagged.sum()} ({precision:.2f} / {flipped[flagged].sum() / flipped.sum():.2f})"
        print(f"| {name} | {result.model_state.test_accuracy:.3f} | {label} | {roc_auc_score(flipped, score):.3f} | "
              f"{average_precision_score(flipped, score):.3f} | {top:.3f} | {flag_text} |")
    print(f"<!-- {name}: {time.time() - start:.1f} s -->")
