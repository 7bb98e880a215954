#!/usr/bin/env python
"""The control row of the README's "Fixing the data": fine-tuning alone, no influence step.

    python scripts/fix_control.py [-c digits-mlp] [--steps 100] [--set key=value ...]

Takes the same examples as `infl fix --flagged` (the flagged rows of mislabels.csv with
their suggested labels), fine-tunes a copy of the run's model for --steps optimizer steps
of its training recipe on the relabelled data, and prints its test accuracy and loss:
what `infl fix --flagged --finetune-steps N` would give without the correction step.
"""
from __future__ import annotations

import argparse
import copy

from influence_cli.app import Session, ensure_model
from influence_cli.app.correct import corrected_train_set, finetune, split_metrics
from influence_cli.app.fix import select_fix_set
from influence_cli.config import load_config
from influence_cli.progress import Reporter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="digits-mlp")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    session = Session(config, Reporter())
    state = ensure_model(session)
    data = session.data()
    chosen = select_fix_set(session, "relabel", None)
    target = corrected_train_set(data.train, chosen.rows, "relabel", chosen.new_labels)
    model = copy.deepcopy(state.model)
    finetune(model, target, config, args.steps, session.model_seed)
    test = split_metrics(model, data.test)
    print(f"{len(chosen.rows)} relabelled; fine-tune only ({args.steps} steps): test accuracy "
          f"{test['accuracy']:.4f}, test loss {test['loss']:.4f} (noisy model {state.test_accuracy:.4f})")


if __name__ == "__main__":
    main()
