"""``influence.strategy: auto``: the one place where the strategy a session uses is decided.

Rule (README "What the numbers mean"): ``exact`` when the tracked layers have at most
``influence.exact.max_params`` parameters (default 20,000: the dense damped curvature then
takes 8·P² bytes ≤ 3.0 GiB) and building it is affordable (N·P² ≤ 1e12 for N training
examples), otherwise ``ekfac`` (any size, ≈ 2 epochs). ``exact`` measured the best LDS of
any strategy on digits-mlp (README "How far to trust the rankings"). An explicit
``--strategy`` or ``influence.strategy`` always wins. The choice and its reason are said
once per session (stderr) and stored in the factors' meta.json (``strategy_choice``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

AUTO = "auto"
AUTO_SMALL = "exact"
AUTO_LARGE = "ekfac"
# Building the dense curvature costs about N·P² multiply-adds per class; digits-mlp (1,437
# examples, 9,610 parameters: 1.3e11) took ≈ 10 s on a 2-core CPU. Above 1e12 (≈ 8× that)
# auto keeps ekfac even when the matrix would fit in memory.
AUTO_MAX_WORK = 1e12

__all__ = ["AUTO", "StrategyChoice", "auto_choice", "tracked_parameters", "resolve_strategy", "choice_meta"]


@dataclass(frozen=True)
class StrategyChoice:
    """The strategy a session runs, what was asked for and why."""

    strategy: str
    requested: str
    reason: str
    tracked_parameters: Optional[int] = None


def auto_choice(parameters: int, max_params: int, examples: int = 0) -> StrategyChoice:
    """The auto rule on a tracked parameter count and the training set size (pure)."""
    memory = 8 * parameters * parameters / 2**30
    work = float(examples) * parameters * parameters
    if parameters > max_params:
        reason = (f"{parameters:,} tracked parameters > influence.exact.max_params = {max_params:,} "
                  f"(dense curvature would take ≈ {memory:.1f} GiB)")
        return StrategyChoice(AUTO_LARGE, AUTO, reason, parameters)
    if work > AUTO_MAX_WORK:
        reason = (f"{examples:,} examples × {parameters:,}² tracked parameters = {work:.1e} > {AUTO_MAX_WORK:.0e}: "
                  "the dense curvature would take too long to build")
        return StrategyChoice(AUTO_LARGE, AUTO, reason, parameters)
    reason = (f"{parameters:,} tracked parameters ≤ influence.exact.max_params = {max_params:,} "
              f"(dense curvature ≈ {memory:.2f} GiB)")
    return StrategyChoice(AUTO_SMALL, AUTO, reason, parameters)


def tracked_parameters(session: Any) -> int:
    """Weights and biases of the layers the session tracks, on a freshly built model (cheap:
    no training, no checkpoint; the architecture alone decides)."""
    from influence_cli.engine import select_modules
    from influence_cli.models import build_model

    config, data = session.config, session.data()
    model = build_model(config.model, tuple(data.input_shape), len(data.class_names), seed=session.model_seed, base_dir=config.base_dir)
    modules = select_modules(model, config.influence.modules)
    return sum(p.numel() for module in modules.values() for p in module.parameters(recurse=False))


def resolve_strategy(session: Any, requested: Optional[str] = None) -> str:
    """The strategy to run: ``requested`` (``--strategy``), else ``influence.strategy``;
    ``auto`` is resolved by :func:`auto_choice` and said once per session."""
    asked = requested or session.config.influence.strategy
    if asked != AUTO:
        if session.strategy_choice is None or session.strategy_choice.strategy != asked:
            session.strategy_choice = StrategyChoice(asked, asked, "set explicitly")
        return asked
    if session.strategy_choice is None or session.strategy_choice.requested != AUTO:
        options = session.config.influence.strategy_options(AUTO_SMALL) or {}
        choice = auto_choice(tracked_parameters(session), int(options.get("max_params", 20000)), len(session.data().train))
        session.strategy_choice = choice
        session.reporter.info(f"strategy: auto → {choice.strategy} ({choice.reason})")
    return session.strategy_choice.strategy


def choice_meta(session: Any, strategy: str) -> dict[str, Any]:
    """The ``strategy_choice`` entry of the factors' meta.json (empty for another strategy)."""
    choice = session.strategy_choice
    if choice is None or choice.strategy != strategy:
        return {}
    return {"strategy_choice": {k: v for k, v in asdict(choice).items() if v is not None}}
