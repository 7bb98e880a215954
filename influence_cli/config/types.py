"""The config's shared building blocks: strict numbers (a YAML boolean is refused) and the
strict base model every section derives from (unknown keys and inf/nan refused)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


#: Seeds reach sklearn's ``random_state`` (and numpy's legacy RandomState), which take 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


def _not_bool(value: Any) -> Any:
    """YAML reads yes/no/true/false as booleans; a number field must not take them as 1/0."""
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is a YAML boolean, not a number; write a number")
    return value


#: Numbers of the schema: a YAML boolean is refused instead of read as 1 or 0.
Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
#: A positive size (layer width, channel count, image side): at least 1.
Size = Annotated[int, BeforeValidator(_not_bool), Field(ge=1)]
Seed = Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=MAX_SEED)]


class _Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or `damping_factor: .nan` are refused at load time.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def check_factory(section: str, selector: str, chosen: str, factory: str | None) -> None:
    """The pairing rule of every ``factory`` field (data.source / model.arch): the selector
    names ``factory`` exactly when a ``'package.module:function'`` is given."""
    if chosen == "factory" and not factory:
        raise ValueError(f"{selector} 'factory' needs {section}.factory: 'package.module:function'")
    if factory and chosen != "factory":
        raise ValueError(f"{section}.factory is set: also set {section}.{selector}: factory")
    if factory and ":" not in factory:
        raise ValueError(f"{section}.factory must look like 'package.module:function'")
