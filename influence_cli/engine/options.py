"""Strategy options: a stdlib ``@dataclass`` per strategy, validated in ``__post_init__``.

Declare each option with :func:`option` (default, help text, numeric bounds, an optional
``check`` that normalises or refuses a value), and call :func:`validate_options` from
``__post_init__``::

    @dataclass
    class LissaOptions:
        depth: int = option(3000, "recursion steps per solve", ge=1)

        def __post_init__(self) -> None:
            validate_options(self)

A bad value raises ``ValueError("depth: must be >= 1, not 0")``. The same declarations
(:func:`option_specs`) let the app's config layer build its ``influence.<strategy>``
section — types, defaults, bounds, help and checks — without the engine knowing about
the config library. Standard library only: importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

__all__ = [
    "option",
    "validate_options",
    "OptionSpec",
    "option_specs",
    "options_dict",
    "auto_or_positive",
    "auto_or_positive_or_none",
    "CURVATURES",
    "Curvature",
]

CURVATURES = ("gauss_newton", "hessian")
Curvature = Literal["gauss_newton", "hessian"]
_BOUNDS = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
           "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}


def option(
    default: Any,
    help: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    check: Callable[[Any], Any] | None = None,
) -> Any:
    """A dataclass field with its help text, numeric bounds and an optional ``check``
    (returns the normalised value or raises ValueError with the reason)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return dataclasses.field(default=default, metadata={"help": help, "bounds": bounds, "check": check})


@dataclass(frozen=True)
class OptionSpec:
    """One declared option: what a config layer needs to validate it."""

    name: str
    type: Any  # the resolved annotation (int, Literal[...], Union[...], ...)
    default: Any
    help: str
    bounds: dict[str, float]
    check: Callable[[Any], Any] | None


def option_specs(options_type: type) -> list[OptionSpec]:
    """The options of a strategy's dataclass, in declaration order."""
    hints = typing.get_type_hints(options_type)
    specs = []
    for f in dataclasses.fields(options_type):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        meta = f.metadata
        specs.append(OptionSpec(f.name, hints[f.name], default, meta.get("help", ""), dict(meta.get("bounds", {})),
                                meta.get("check")))
    return specs


def options_dict(options: Any) -> dict[str, Any]:
    """The options as a plain {name: value} dict (None → {})."""
    return {} if options is None else dataclasses.asdict(options)


def validate_options(obj: Any) -> None:
    """Check (and normalise in place) every option of a dataclass instance; ValueError
    naming the option otherwise."""
    for spec in option_specs(type(obj)):
        value = getattr(obj, spec.name)
        try:
            value = _check_value(spec, value)
        except ValueError as exc:
            raise ValueError(f"{spec.name}: {exc}") from None
        object.__setattr__(obj, spec.name, value)


def _check_value(spec: OptionSpec, value: Any) -> Any:
    if spec.check is not None:
        value = spec.check(value)
    value = _check_type(spec.type, value)
    for key, bound in spec.bounds.items():
        ok, sign = _BOUNDS[key]
        if not ok(value, bound):
            raise ValueError(f"must be {sign} {bound}, not {value!r}")
    return value


def _check_type(annotation: Any, value: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(str, choices))}, not {value!r}")
        return value
    if origin is Union:
        for arm in typing.get_args(annotation):
            try:
                return _check_type(arm, value)
            except ValueError:
                continue
        raise ValueError(f"{value!r} is not a valid value")
    if annotation is type(None):
        if value is not None:
            raise ValueError(f"must be null, not {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, not {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, not {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, not {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {value!r}")
        return value
    return value


def auto_or_positive(value: Any) -> Union[str, float]:
    """'auto' or a finite number > 0 (as float)."""
    if value == "auto":
        return value
    if isinstance(value, bool):  # YAML's yes/true would read as 1
        raise ValueError("must be 'auto' or a number > 0")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be 'auto' or a number > 0") from None
    if not number > 0 or not math.isfinite(number):
        raise ValueError("must be 'auto' or a number > 0")
    return number


def auto_or_positive_or_none(value: Any) -> Optional[Union[str, float]]:
    """None, 'auto' or a finite number > 0."""
    return None if value is None else auto_or_positive(value)
