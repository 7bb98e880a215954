"""The influence-function engine: strategies, fitting, scoring. Torch only — no CLI,
config or app imports — and usable as a library::

    from influence_cli.engine import fit_factors, load_factors, self_influence, pairwise_scores
    factors = fit_factors(model, loader)             # EK-FAC by default
    scores = self_influence(model, factors, loader)  # (N,), g_iᵀ (H + λI)⁻¹ g_i

Nothing here prints; progress is reported through ``on_batch(stage, n)`` callbacks.

Layers (each imports only the ones above it):

- options, strategy (+ strategies/): the Strategy interface, its registry and the
  built-in declarations — standard library only, so listing strategies needs no torch;
- batching, rng, kernels, tracked, storage, damping: loaders and devices, Fisher label
  sampling, GEMM / per-example-gradient / Gram kernels, tracked layers, the stored form;
- capture: forward hooks recording per-example (a, g);
- fitting, passes, eigen, blockfit, factors, operators, block_scores: the block
  strategies (per-layer eigenbases + eigenvalues) and their fast scoring paths;
- flat, curvature, solvers/: the strategies over the whole parameter vector;
- scoring: the one self-influence / pairwise loop over any bound preconditioner;
- correction: remove / relabel parameter steps θ ± (1/n)·P·Σg through the same bound P;
- value: the influence of each training example on a whole query set (one pass);
- api: fit_factors / load_factors / factors_from_sums by strategy name.

The names of the numerical layers are loaded on first use (PEP 562), so that
``import influence_cli.engine`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

import influence_cli.engine.strategies  # noqa: F401  (registers the built-ins)
from influence_cli.engine.options import OptionSpec, option, option_specs, options_dict, validate_options
from influence_cli.engine.strategy import (
    STRATEGIES,
    BlockStrategy,
    FitRequest,
    Strategy,
    available_strategies,
    get_strategy,
    register_strategy,
    stored_options,
    strategy_names,
    strategy_warnings,
    unregister_strategy,
)

_LAZY = {
    # front door
    "fit_factors": "api", "load_factors": "api", "factors_from_sums": "api",
    # scoring
    "self_influence": "scoring", "pairwise_scores": "scoring", "preconditioned_test_gradients": "scoring",
    "gradient_batches": "scoring", "TopInfluences": "scoring", "BoundPreconditioner": "scoring",
    "measurement_loss": "scoring", "MEASUREMENTS": "scoring",
    # parameter corrections (remove / relabel without retraining)
    "correction_direction": "correction", "correct_model": "correction", "apply_correction": "correction",
    "Correction": "correction", "CorrectionResult": "correction", "untracked_parameters": "correction",
    "value_scores": "value", "summed_query_gradients": "value",
    # block strategies
    "Factors": "factors", "dense_preconditioner": "factors",
    "LayerFactors": "operators", "LayerOperator": "operators", "precondition": "operators",
    "precondition_all": "operators",
    "CovarianceSums": "passes", "bases_from_covariances": "eigen",
    "covariance_sums": "blockfit", "eigenvalue_sums": "blockfit", "MergedSums": "blockfit",
    "FitContext": "fitting",
    # capture, batching, storage
    "ActivationCapture": "capture", "LayerBatch": "capture", "select_modules": "tracked",
    "sample_fisher_labels": "rng", "read_meta": "storage", "resolve_device": "batching",
    # flat-vector strategies
    "ParameterLayout": "flat", "flat_gradients": "flat", "DENSE_DAMPING_FACTOR": "flat",
    "CurvatureProducts": "curvature",
    "ExactSolver": "solvers.exact", "fit_exact": "solvers.exact",
    "LissaSolver": "solvers.lissa", "LissaDivergenceError": "solvers.lissa", "fit_lissa": "solvers.lissa",
}

__all__ = [
    "STRATEGIES",
    "BlockStrategy",
    "FitRequest",
    "OptionSpec",
    "Strategy",
    "available_strategies",
    "get_strategy",
    "option",
    "option_specs",
    "options_dict",
    "register_strategy",
    "stored_options",
    "strategy_names",
    "strategy_warnings",
    "unregister_strategy",
    "validate_options",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
