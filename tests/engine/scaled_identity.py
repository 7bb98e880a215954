"""A toy strategy in one file: the identity preconditioner times a constant.

Importing this module registers ``scaled_identity``; nothing else has to change for the
CLI (--strategy choices and help), the config (``influence.scaled_identity.scale``),
the factor cache (its option is part of the influence hash) and ``infl evaluate``'s
default set to pick it up. P = scale · I, so every score is scale × the identity's.
"""

from __future__ import annotations

from dataclasses import dataclass

from influence_cli.engine import BlockStrategy, option, validate_options


@dataclass
class ScaledIdentityOptions:
    scale: float = option(2.0, "multiplies every gradient inner product", gt=0)

    def __post_init__(self) -> None:
        validate_options(self)


class ScaledIdentity(BlockStrategy):
    name = "scaled_identity"
    description = "identity preconditioner times a constant (a test fixture)"
    options_type = ScaledIdentityOptions
    passes = ()  # no curvature to fit: only the example count

    @property
    def fixed_damping(self) -> float:  # Λ = 0 and λ = 1/scale: P = scale · I
        return 1.0 / self.options.scale

    def fit_layers(self, ctx):
        return {name: (None, None, zeros) for name, zeros in ctx.zero_eigenvalues().items()}, ctx.count_examples()
