"""Self-evaluation: can the user trust the numbers?

- :func:`evaluate_noise_detection` (``infl evaluate --noise F``): flip a fraction of the
  training labels, train on them, and score how well each strategy's self-influence (and
  the loss / gradient-norm baselines) ranks the flipped examples first.
- :func:`evaluate_lds` (``infl evaluate --lds``): the linear datamodeling score — rank
  correlation between influence-predicted and actually retrained test losses over random
  training subsets.
- :func:`.tuning.tune_damping` (``infl evaluate --tune-damping``): held-out LDS per damping
  factor of a small grid; the best goes to ``runs/<name>/damping.json`` (``damping: tuned``).
- :mod:`.metrics`: AUROC, average precision, precision@k, recall@fraction, Spearman.

:func:`run_evaluate` runs either or both (what ``infl evaluate`` does, its one entry
point); the tables are drawn by :mod:`influence_cli.render.evaluation`. Both evaluations
share one per-strategy loop, :func:`.common.score_strategies`; the LDS retrainings and their
cache are in :mod:`.retraining`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from .common import default_strategies
from .detection import evaluate_noise_detection, noisy_config
from .lds import evaluate_lds
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
    on_result: Optional[Callable[[str, dict[str, Any]], None]] = None,
    tune: Optional[dict[str, Any]] = None,
    fix: bool = False,
) -> dict[str, Any]:
    """``infl evaluate``: noise detection when ``noise`` is given, LDS when ``lds``; with
    neither, noise detection at 0.1. Calls ``on_result(part, result)`` as each part
    finishes (the CLI draws its table there) and returns
    ``{"noise_detection": {...}, "lds": {...}}`` (only the parts that ran). ``fix``: the
    fixing curve at ``noise`` (default 0.1) instead of noise detection (``"fixing"``)."""
    strategies = list(strategies) if strategies is not None else None
    out: dict[str, Any] = {}
    if tune is not None:  # first, so that --lds with damping: tuned already sees the new factor
        from .tuning import tune_damping

        out["damping_tuning"] = tune_damping(config, fraction=fraction, test_rows=test_rows, measurement=measurement,
                                             reporter=reporter, **tune)
        if on_result is not None:
            on_result("damping_tuning", out["damping_tuning"])
    if fix:
        from .fixing import evaluate_fixing

        out["fixing"] = evaluate_fixing(
            config, fraction=0.1 if noise is None else noise, kind=noise_kind, strategies=strategies, reporter=reporter
        )
        if on_result is not None:
            on_result("fixing", out["fixing"])
        noise = None
        if not lds:
            return out
    if noise is None and not lds and tune is None and not fix:
        noise = 0.1
    if noise is not None:
        out["noise_detection"] = evaluate_noise_detection(
            config, fraction=noise, kind=noise_kind, strategies=strategies, reporter=reporter
        )
        if on_result is not None:
            on_result("noise_detection", out["noise_detection"])
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
        if on_result is not None:
            on_result("lds", out["lds"])
    return out
