"""``python -m influence_cli.evaluation``: the evaluate command without the main CLI.

Examples::

    python -m influence_cli.evaluation --noise 0.1
    python -m influence_cli.evaluation -c digits-cnn --noise 0.1 --set output.dir=/tmp/runs
    python -m influence_cli.evaluation --lds --subsets 50 --test-rows 100
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from rich.console import Console


def main(argv: Optional[list[str]] = None) -> int:
    from influence_cli.config import load_config
    from influence_cli.errors import InflError
    from influence_cli.progress import RichReporter

    from . import run_evaluate

    parser = argparse.ArgumentParser(prog="python -m influence_cli.evaluation", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=None, help="config file or bundled name (default digits-mlp)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--noise", type=float, default=None, help="label-noise detection with this fraction flipped")
    parser.add_argument("--noise-kind", default="uniform", choices=["uniform", "class_conditional"])
    parser.add_argument("--lds", action="store_true", help="linear datamodeling score against retraining")
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.5, help="LDS subset size as a fraction of the training set")
    parser.add_argument("--seeds", type=int, default=1, help="LDS retrainings per subset (averaged)")
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--measurement", default="loss", choices=["loss", "margin"])
    parser.add_argument("--strategy", dest="strategies", action="append", default=None,
                        help="strategy to evaluate (repeatable; default: all but the very slow ones)")
    args = parser.parse_args(argv)
    out, err = Console(), Console(stderr=True)
    try:
        config = load_config(args.config, args.overrides)
        run_evaluate(
            config,
            noise=args.noise,
            noise_kind=args.noise_kind,
            lds=args.lds,
            subsets=args.subsets,
            fraction=args.fraction,
            seeds=args.seeds,
            test_rows=args.test_rows,
            measurement=args.measurement,
            strategies=args.strategies,
            reporter=RichReporter(err),
            console=out,
        )
    except InflError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
