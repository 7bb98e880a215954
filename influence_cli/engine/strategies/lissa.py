"""lissa: the dense damped curvature solved by LiSSA's stochastic Neumann series.

Only curvature-vector products, so any model size, but every preconditioned vector
costs depth × repeats minibatch products and self-influence solves one system per
training example: slow, left out of evaluate's default set. The solver is
``engine.solvers.lissa``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from influence_cli.engine.options import (
    Curvature,
    auto_or_positive,
    auto_or_positive_or_none,
    option,
    validate_options,
)
from influence_cli.engine.strategy import FitRequest, Strategy

__all__ = ["Lissa", "LissaOptions"]


@dataclass
class LissaOptions:
    """Stochastic Neumann-series solver: (H + lambda I)^-1 v by `depth` minibatch steps."""

    curvature: Curvature = option("gauss_newton", "gauss_newton (positive semi-definite) or hessian")
    depth: int = option(3000, "recursion steps per solve", ge=1)
    scale: Union[float, str] = option(
        "auto", "'auto' (from the largest curvature eigenvalue) or a number > 0", check=auto_or_positive
    )
    damping: Optional[Union[float, str]] = option(
        None, "null = influence.damping; 'auto' or a number > 0", check=auto_or_positive_or_none
    )
    repeats: int = option(1, "independent solves averaged", ge=1)
    batch_size: int = option(64, "training examples per curvature product", ge=1)

    def __post_init__(self) -> None:
        validate_options(self)


class Lissa(Strategy):
    name = "lissa"
    description = "LiSSA stochastic iterative solve, any model size (slow: one solve per scored example)"
    default_damping_factor = 3.0  # solves the same system as exact
    passes = ("trace", "power-iteration")
    options_type = LissaOptions
    slow = True

    def fit(self, request: FitRequest) -> Any:
        from influence_cli.engine.solvers.lissa import fit_lissa

        o = self.options
        return fit_lissa(
            request.model, request.loader, modules=request.modules, curvature=o.curvature,
            damping=request.damping if o.damping is None else o.damping, damping_factor=request.damping_factor,
            depth=o.depth, scale=o.scale, repeats=o.repeats, batch_size=o.batch_size, seed=request.seed,
            device=request.device, on_batch=request.on_batch,
        )

    @classmethod
    def load(cls, directory: Any) -> Any:
        from influence_cli.engine.solvers.lissa import LissaSolver

        return LissaSolver.load(directory)

    @classmethod
    def warnings(cls, state: Any, *, per_example: bool) -> list[str]:
        """LiSSA's cost and convergence, said before the slow part starts."""
        out = []
        if per_example:
            out.append(f"{state.cost_note} (slow: use ekfac or exact for a full audit)")
        left = state.unconverged_fraction
        if left > 0.1:
            out.append(
                f"LiSSA: with damping {state.damping:.3g} and scale {state.scale:.3g}, depth {state.depth} leaves "
                f"{100 * left:.0f} % of the solution along the flattest curvature directions unreached; "
                f"set influence.lissa.depth to about {state.depth_for(0.1)} or raise influence.lissa.damping"
            )
        return out
