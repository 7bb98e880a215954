"""Self-evaluation: can the user trust the numbers?

- :func:`evaluate_noise_detection` (``infl evaluate --noise F``): flip a fraction of the
  training labels, train on them, and score how well each strategy's self-influence (and
  the loss / gradient-norm baselines) ranks the flipped examples first.
- :func:`evaluate_lds` (``infl evaluate --lds``): the linear datamodeling score — rank
  correlation between influence-predicted and actually retrained test losses over random
  training subsets.
- :mod:`.metrics`: AUROC, average precision, precision@k, recall@fraction, Spearman.

:func:`run_evaluate` runs either or both and renders the tables (what ``infl evaluate``
does); ``python -m influence_cli.evaluation --help`` is a stand-alone entry point.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from .common import default_strategies
from .detection import evaluate_noise_detection, noisy_config, render_detection_table
from .lds import evaluate_lds, render_lds_table
from .metrics import auroc, average_precision, precision_at_k, recall_at_fraction, spearman

__all__ = [
    "auroc",
    "average_precision",
    "default_strategies",
    "evaluate_lds",
    "evaluate_noise_detection",
    "noisy_config",
    "precision_at_k",
    "recall_at_fraction",
    "render_detection_table",
    "render_lds_table",
    "run_evaluate",
    "spearman",
]


def run_evaluate(
    config: Any,
    *,
    noise: Optional[float] = None,
    noise_kind: str = "uniform",
    lds: bool = False,
    subsets: int = 100,
    fraction: float = 0.5,
    seeds: int = 1,
    test_rows: int = 100,
    measurement: str = "loss",
    strategies: Optional[Iterable[str]] = None,
    reporter: Any = None,
    console: Any = None,
) -> dict[str, Any]:
    """``infl evaluate``: noise detection when ``noise`` is given, LDS when ``lds``; with
    neither, noise detection at 0.1. Renders each table on ``console`` when given and
    returns ``{"noise_detection": {...}, "lds": {...}}`` (only the parts that ran)."""
    strategies = list(strategies) if strategies is not None else None
    if noise is None and not lds:
        noise = 0.1
    out: dict[str, Any] = {}
    if noise is not None:
        out["noise_detection"] = evaluate_noise_detection(
            config, fraction=noise, kind=noise_kind, strategies=strategies, reporter=reporter
        )
        if console is not None:
            render_detection_table(out["noise_detection"], console)
    if lds:
        out["lds"] = evaluate_lds(
            config,
            subsets=subsets,
            fraction=fraction,
            seeds=seeds,
            test_rows=test_rows,
            measurement=measurement,
            strategies=strategies,
            reporter=reporter,
        )
        if console is not None:
            render_lds_table(out["lds"], console)
    return out
