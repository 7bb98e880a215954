"""Influence-function engine: tracked layers, curvature factors, scores.

Usable as a library without the CLI::

    from influence_cli.influence import fit_factors, self_influence, pairwise_scores
    factors = fit_factors(model, loader)            # EK-FAC by default
    scores = self_influence(model, factors, loader)  # (N,), g_iᵀ (H + λI)⁻¹ g_i

Nothing here prints; progress is reported through ``on_batch(stage, n)`` callbacks.
"""

from influence_cli.influence.factors import (
    STRATEGIES,
    Factors,
    LayerFactors,
    Strategy,
    available_strategies,
    dense_preconditioner,
    fit_factors,
    register_strategy,
)
from influence_cli.influence.modules import ActivationCapture, LayerBatch, select_modules
from influence_cli.influence.precondition import LayerOperator, precondition, precondition_all
from influence_cli.influence.curvature import CurvatureProducts, ParameterLayout
from influence_cli.influence.solvers import (
    ExactSolver,
    LissaDivergenceError,
    LissaSolver,
    fit_exact,
    fit_lissa,
    load_factors,
)
from influence_cli.influence.scores import (
    TopInfluences,
    pairwise_scores,
    preconditioned_test_gradients,
    self_influence,
)

__all__ = [
    "STRATEGIES",
    "ActivationCapture",
    "CurvatureProducts",
    "ExactSolver",
    "LissaDivergenceError",
    "LissaSolver",
    "ParameterLayout",
    "fit_exact",
    "fit_lissa",
    "load_factors",
    "Factors",
    "LayerBatch",
    "LayerFactors",
    "LayerOperator",
    "Strategy",
    "TopInfluences",
    "available_strategies",
    "dense_preconditioner",
    "fit_factors",
    "pairwise_scores",
    "precondition",
    "precondition_all",
    "preconditioned_test_gradients",
    "register_strategy",
    "select_modules",
    "self_influence",
]
