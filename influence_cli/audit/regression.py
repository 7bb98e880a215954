"""The self-influence ranking for ``task: regression``: outliers, not label flips.

Same columns as the classification ranking (SELF_INFLUENCE_COLUMNS), so every renderer
and the check gate read it unchanged, with these meanings:

- ``label`` / ``predicted``: the target and the model's prediction (floats; the first
  output for a model with several), ``label_name`` / ``predicted_name`` the same as text;
- ``label_prob``: empty (NaN), there is no class probability;
- ``loss``: ½‖f(x) − y‖², the squared-error loss the influence is computed on;
- ``flagged``: the flagging rule's candidates (audit.flag.rule and k / fraction);
  ``require_disagreement`` does not apply, there is no class to disagree with;
- ``suggested_label``: always empty: an outlier has no better label to suggest.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from influence_cli.audit.ranking import SELF_INFLUENCE_COLUMNS, _check_finite, ranking_order, robust_z, top_count
from influence_cli.config import FlagConfig


def outlier_mask(self_influence: np.ndarray, flag: Optional[FlagConfig] = None) -> np.ndarray:
    """Candidates of the flagging rule (mad or top_fraction), in training order."""
    flag = flag or FlagConfig()
    s = np.asarray(self_influence, dtype=np.float64).reshape(-1)
    if flag.rule == "mad":
        return robust_z(s) > flag.k
    mask = np.zeros(s.size, dtype=bool)
    mask[ranking_order(s)[: top_count(flag.fraction, s.size)]] = True
    return mask


def build_regression_ranking(
    self_influence: np.ndarray, targets: np.ndarray, predictions: np.ndarray, ids: Sequence[Any],
    flag: Optional[FlagConfig] = None,
) -> pd.DataFrame:
    """One row per training example, sorted by rank (see the module docstring)."""
    s = np.asarray(self_influence, dtype=np.float64).reshape(-1)
    n = s.size
    y = np.asarray(targets, dtype=np.float64).reshape(n, -1)
    f = np.asarray(predictions, dtype=np.float64).reshape(n, -1)
    _check_finite(s)
    loss = 0.5 * ((f - y) ** 2).sum(axis=1)
    flagged = outlier_mask(s, flag)
    order = ranking_order(s)
    text = np.vectorize(lambda v: f"{v:.6g}", otypes=[object])
    return pd.DataFrame(
        {
            "rank": np.arange(1, n + 1, dtype=np.int64),
            "index": order.astype(np.int64),
            "id": pd.Series(np.array([str(i) for i in ids], dtype=object)[order] if n else [], dtype=object),
            "label": y[order, 0],
            "label_name": pd.Series(text(y[order, 0]) if n else [], dtype=object),
            "predicted": f[order, 0],
            "predicted_name": pd.Series(text(f[order, 0]) if n else [], dtype=object),
            "label_prob": np.full(n, np.nan),
            "loss": loss[order],
            "self_influence": s[order],
            "flagged": flagged[order].astype(bool),
            "suggested_label": pd.Series([""] * n, dtype=object),
        },
        columns=SELF_INFLUENCE_COLUMNS,
    )


def regression_summary(df: pd.DataFrame, target_name: str) -> dict:
    """class_summary's shape with one group (every example) and no given → suggested pairs."""
    n, flagged = int(len(df)), int(df["flagged"].sum())
    share = float(flagged / n) if n else 0.0
    return {
        "totals": {"examples": n, "flagged": flagged, "flagged_fraction": share, "classes": 1},
        "classes": [{"label": 0, "name": f"{target_name} (regression)", "examples": n, "flagged": flagged,
                     "flagged_fraction": share}],
        "pairs": [],
    }
