"""The ``Strategy`` interface and its registry: one class per way of applying (H + λI)⁻¹.

A strategy is a class. Defining a subclass with a ``name`` registers it, and everything
that used to branch on strategy names reads the class instead: the CLI's ``--strategy``
choices and help (``name``, ``description``), the config's ``influence.<name>`` section
(``options_type``), the cache hash (:meth:`Strategy.stored_options`), ``damping: auto``
(``default_damping_factor``), evaluate's default set (``slow``), ``--shard`` jobs and
``infl merge`` (``shardable``, ``passes``), torchrun (``data_parallel``) and warnings
(:meth:`Strategy.warnings`). See docs/architecture.md, "Adding a strategy".

This module and the declarations in ``engine/strategies/`` import neither torch nor any
app module, so the CLI can list strategies and validate configs without loading torch;
fitting and loading import the numerical modules when they run.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from influence_cli.engine.options import options_dict
from influence_cli.errors import InfluenceError

__all__ = [
    "Strategy",
    "BlockStrategy",
    "FitRequest",
    "STRATEGIES",
    "register_strategy",
    "unregister_strategy",
    "get_strategy",
    "strategy_names",
    "available_strategies",
    "stored_options",
    "strategy_warnings",
]


@dataclass
class FitRequest:
    """What ``fit_factors`` was asked for; each strategy uses the parts that apply to it.

    damping_factor is resolved (the strategy's default when the caller gave none).
    """

    model: Any  # torch.nn.Module
    loader: Any  # re-iterable of (inputs, labels[, indices]) batches
    damping: str | float = "auto"
    damping_factor: float = 0.1
    damping_scope: str = "global"
    fisher: str = "true"
    modules: Any = None  # fnmatch patterns, a ready {name: module} dict, or None (all)
    device: Any = None
    dtype: Any = None  # torch.dtype of the stored tensors
    seed: int = 0
    on_batch: Any = None  # ProgressCallback
    reference: bool = False
    cache_bytes: int = 0
    dist: Any = None  # DistContext-like, only for data_parallel strategies
    amp: str | None = None


class Strategy(abc.ABC):
    """Base class of every strategy. Subclasses set the class attributes and implement
    :meth:`fit` and :meth:`load`; a subclass with a ``name`` registers itself (pass
    ``register=False`` in the class statement to keep it out of the registry).

    An instance carries the validated options (``self.options``, an ``options_type``
    instance, or None for strategies without options).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    default_damping_factor: ClassVar[float] = 0.1  # damping "auto" = this × mean eigenvalue
    passes: ClassVar[tuple[str, ...]] = ()  # the data passes of a fit, in order (progress stages)
    options_type: ClassVar[type | None] = None  # a @dataclass validated in __post_init__
    slow: ClassVar[bool] = False  # scoring costs far more than a few epochs: not in evaluate's default set
    shardable: ClassVar[bool] = False  # fitted by --shard jobs + infl merge (summed passes)
    data_parallel: ClassVar[bool] = False  # fit accepts a process group (each rank its own data)
    psd: ClassVar[bool] = True  # with default options, self-influence is ≥ 0

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register and cls.__dict__.get("name"):
            register_strategy(cls)

    def __init__(self, options: Any = None) -> None:
        self.options = self.make_options(options)

    @classmethod
    def make_options(cls, options: Any = None) -> Any:
        """The validated options from None, a dict or an ``options_type`` instance."""
        if cls.options_type is None:
            if options:
                given = sorted(options) if isinstance(options, dict) else options
                raise InfluenceError(f"strategy {cls.name!r} takes no options, got {given}")
            return None
        if isinstance(options, cls.options_type):
            return options
        values = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls.options_type)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InfluenceError(f"{cls.name}: unknown options {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            return cls.options_type(**values)
        except ValueError as exc:
            raise InfluenceError(f"{cls.name}: {exc}") from None

    # ------------------------------------------------------------------ hooks
    # Required hooks are abstract; register_strategy refuses a class that leaves one
    # unimplemented, so a broken strategy fails when it is defined, not mid-fit.
    @abc.abstractmethod
    def fit(self, request: FitRequest) -> Any:
        """Fit on ``request.loader`` and return the preconditioner (an object with
        ``strategy``, ``save(directory, extra_meta)``, ``check_model(model)`` and
        ``bind(model, device, loader=, on_batch=)`` → a bound preconditioner that the
        scoring loop drives; see ``engine.scoring.BoundPreconditioner``)."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: Any) -> Any:
        """The preconditioner stored in ``directory`` by its ``save``."""

    @classmethod
    def stored_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The options (given as a plain dict) that shape the stored state: the cache
        hash covers exactly these. Default: all of them."""
        return dict(values)

    @classmethod
    def warnings(cls, state: Any, *, per_example: bool) -> list[str]:
        """Warnings to show before scoring with ``state`` (per_example: self-influence,
        one solve per training example). Default: none."""
        return []

    def options_dict(self) -> dict[str, Any]:
        return options_dict(self.options)


class BlockStrategy(Strategy, register=False):
    """Layers as independent blocks, each an eigenbasis (Q_S, Q_A; None = identity) and
    eigenvalues Λ, one preconditioner formula for all (``engine.factors.Factors``).

    Subclasses implement :meth:`fit_layers` (and :meth:`from_sums` when shardable).
    """

    shardable = True
    data_parallel = True
    fixed_damping: ClassVar[float | None] = None  # overrides the damping rule (identity: 1)

    @abc.abstractmethod
    def fit_layers(self, ctx: Any) -> tuple[dict[str, tuple[Any, Any, Any]], int]:
        """({layer: (Q_S, Q_A, Λ)} with float64 Λ (d_out, d_in), examples seen) from a
        ``engine.fitting.FitContext``."""

    def from_sums(self, ctx: Any, sums: Any) -> tuple[dict[str, tuple[Any, Any, Any]], int]:
        """The same from merged ``--shard`` sums (``engine.blockfit.MergedSums``)."""
        raise InfluenceError(f"strategy {self.name!r} cannot be fitted in shards")

    def fit(self, request: FitRequest) -> Any:
        from influence_cli.engine.blockfit import fit_blocks

        return fit_blocks(self, request)

    @classmethod
    def load(cls, directory: Any) -> Any:
        from influence_cli.engine.factors import Factors

        return Factors.load(directory)


# ==================================================================== registry
STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Make a strategy class available by name (fit_factors, load_factors, the CLI and
    the config). Subclassing :class:`Strategy` with a ``name`` calls this."""
    if not cls.name or not cls.name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"strategy name {cls.name!r} must be letters, digits, '_' or '-'")
    if not cls.description:
        raise ValueError(f"strategy {cls.name!r} needs a one-line description")
    factor = float(cls.default_damping_factor)
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"strategy {cls.name!r}: default_damping_factor must be a positive number")
    if cls.options_type is not None and not dataclasses.is_dataclass(cls.options_type):
        raise ValueError(f"strategy {cls.name!r}: options_type must be a dataclass")
    missing = sorted(_unimplemented_hooks(cls))
    if missing:
        raise ValueError(f"strategy {cls.name!r} does not implement {', '.join(missing)}")
    STRATEGIES[cls.name] = cls
    return cls


def _unimplemented_hooks(cls: type) -> set[str]:
    """Abstract methods still abstract on ``cls``. (ABCMeta fills ``__abstractmethods__``
    only after ``__init_subclass__`` has run, so registration looks them up itself.)"""
    names = {n for klass in cls.__mro__ for n, v in vars(klass).items() if getattr(v, "__isabstractmethod__", False)}
    return {n for n in names if getattr(_defining(cls, n), "__isabstractmethod__", False)}


def _defining(cls: type, name: str) -> Any:
    return next(vars(klass)[name] for klass in cls.__mro__ if name in vars(klass))


def unregister_strategy(name: str) -> None:
    STRATEGIES.pop(name, None)


def get_strategy(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise InfluenceError(
            f"unknown strategy {name!r}; available: {', '.join(sorted(STRATEGIES))}"
        ) from None


def strategy_names() -> list[str]:
    """Registered names, in registration order (the built-ins first)."""
    return list(STRATEGIES)


def available_strategies() -> dict[str, str]:
    """{name: one-line description} of every registered strategy."""
    return {name: cls.description for name, cls in STRATEGIES.items()}


def stored_options(name: str, values: dict[str, Any] | None) -> dict[str, Any]:
    """The options of strategy ``name`` that shape its stored state ({} without options)."""
    cls = get_strategy(name)
    if cls.options_type is None or not values:
        return {}
    return cls.stored_options(dict(values))


def strategy_warnings(state: Any, *, per_example: bool) -> list[str]:
    """The warnings of the strategy that produced ``state`` (a fitted preconditioner)."""
    cls = STRATEGIES.get(str(getattr(state, "strategy", "")))
    return [] if cls is None else list(cls.warnings(state, per_example=per_example))
