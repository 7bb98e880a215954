"""The mislabel scores ``audit.score`` can rank by, from the engine's per-example terms.

Pure numpy. With g = ∇ℓ(x_i, y_i), g' = ∇ℓ(x_i, y'_i) for the alternative label y'_i (the
most probable other class), P = (H + λI)⁻¹ and n training examples, the engine
(``influence_cli.engine.mislabel``) returns A = gᵀPg, B = g'ᵀPg', C = (g' − g)ᵀP(g' − g)
and the losses ℓ = ℓ(y), ℓ' = ℓ(y'). Polarisation gives g'ᵀPg = (A + B − C) / 2. Every
score is "higher = more suspicious":

- ``self_influence`` = A: how far the model had to bend to fit the example;
- ``loss`` = ℓ: how much it failed to (the training-loss baseline);
- ``margin`` = ℓ − ℓ' = z_y' − z_y: the logit margin of the alternative over the label;
- ``loo_loss`` = ℓ + A/n: the example's own loss had it been left out (first order:
  removing it moves θ by (1/n)Pg, raising ℓ by (1/n)gᵀPg);
- ``relabel_gain`` = (1/n)·g'ᵀP(g' − g) = (B − A + C)/(2n): the first-order increase of
  log p(y'|x_i) from the relabel correction θ' = θ − (1/n)P(g' − g);
- ``loo_margin`` = (ℓ − ℓ') + (1/n)·gᵀP(g − g') = (ℓ − ℓ') + (A − B + C)/(2n): the
  log-odds of the alternative over the given label had the example been left out —
  "would the model, not having seen this row, prefer another class, and by how much";
- ``loo_margin_sm`` = (ℓ − ℓ') + (1/n)·gᵀP(g − g') / (1 + A/n): the same log-odds with a
  Sherman–Morrison leverage correction. A one-step leave-one-out needs the Hessian without
  the row, (nH − h_i)⁻¹; with the empirical-Fisher term h_i ≈ g gᵀ that is P g/(n − A),
  meaningless on the rows that matter (A/n > 1 on most flipped rows of the bundled
  configs: the GGN under-represents a misfit row's own curvature). The well-posed mirror
  image is the response to a *duplicate* of the row, −(nH + g gᵀ)⁻¹g = −P g/(n + A), whose
  margin change is −gᵀP(g − g')/(n + A); ``loo_margin_sm`` is the margin minus it. Equal to
  ``loo_margin`` to first order in 1/n, it shrinks the correction where the row's own
  leverage A/n is large.

``LOG_SCALE`` names the scores that are positive and heavy-tailed, flagged by the robust
z-score of their log (as self-influence always was); the others can be negative and are
flagged on their own scale.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["SCORES", "LOG_SCALE", "mislabel_scores"]

SCORES = ("self_influence", "loss", "margin", "loo_loss", "relabel_gain", "loo_margin", "loo_margin_sm")
LOG_SCALE = frozenset({"self_influence", "loss", "loo_loss"})


def mislabel_scores(terms: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Every score of :data:`SCORES` (float64, training order) from the engine's terms."""
    a = np.asarray(terms["self_influence"], np.float64)
    b = np.asarray(terms["alternative_self_influence"], np.float64)
    c = np.asarray(terms["relabel_self_influence"], np.float64)
    loss = np.asarray(terms["loss"], np.float64)
    margin = loss - np.asarray(terms["alternative_loss"], np.float64)
    n = float(n)
    return {
        "self_influence": a,
        "loss": loss,
        "margin": margin,
        "loo_loss": loss + a / n,
        "relabel_gain": (b - a + c) / (2.0 * n),
        "loo_margin": margin + (a - b + c) / (2.0 * n),
        "loo_margin_sm": margin + (a - b + c) / (2.0 * (n + a)),
    }
