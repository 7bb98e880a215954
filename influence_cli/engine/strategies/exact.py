"""exact: the dense damped curvature over every tracked weight, factorised once.

The reference for small models: cross-layer curvature is kept, P² memory, refused above
``max_params``. The solver is ``engine.solvers.exact``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from influence_cli.engine.options import Curvature, option, validate_options
from influence_cli.engine.strategy import FitRequest, Strategy

__all__ = ["Exact", "ExactOptions"]


@dataclass
class ExactOptions:
    """The dense solver: the full damped curvature over every tracked parameter."""

    curvature: Curvature = option(
        "gauss_newton", "gauss_newton (= true Fisher, positive semi-definite) or hessian"
    )
    max_params: int = option(20000, "refuse models with more tracked parameters (memory ~ 8 P^2 bytes)", ge=1)

    def __post_init__(self) -> None:
        validate_options(self)


class Exact(Strategy):
    name = "exact"
    description = "dense (H + λI)⁻¹ over all tracked layers jointly (small models only)"
    default_damping_factor = 3.0  # the dense GN's best LDS (docs/damping.md)
    passes = ("curvature",)
    options_type = ExactOptions

    def fit(self, request: FitRequest) -> Any:
        from influence_cli.engine.solvers.exact import fit_exact

        return fit_exact(
            request.model, request.loader, modules=request.modules, curvature=self.options.curvature,
            damping=request.damping, damping_factor=request.damping_factor, max_params=self.options.max_params,
            device=request.device, dtype=request.dtype, on_batch=request.on_batch,
        )

    @classmethod
    def load(cls, directory: Any) -> Any:
        from influence_cli.engine.solvers.exact import ExactSolver

        return ExactSolver.load(directory)

    @classmethod
    def stored_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        # max_params only refuses large models; it does not change the fitted factor.
        return {"curvature": values.get("curvature", "gauss_newton")}
