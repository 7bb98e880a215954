"""The ``influence.<strategy>`` config sections, built from the strategy registry.

Every registered strategy that declares options gets a section made from its options
dataclass (types, defaults, bounds, help, checks), so the keys, the defaults and the error
messages are the engine's own. Strategies registered after this module was imported
(plugins) get their section the next time a config is validated (``config_model``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, create_model, field_validator

from influence_cli.config.schema import Config, Float, InfluenceConfig, Int, _Strict


def _check_before(check: Any) -> Any:
    def run(cls: Any, value: Any) -> Any:
        return check(value)

    return run


def _option_section(strategy: Any) -> type[BaseModel]:
    """The pydantic model of ``influence.<strategy.name>``."""
    from influence_cli.engine import option_specs

    fields: dict[str, Any] = {}
    validators: dict[str, Any] = {}
    strict_numbers = {int: Int, float: Float}  # no YAML booleans, no inf/nan, as everywhere
    for spec in option_specs(strategy.options_type):
        fields[spec.name] = (strict_numbers.get(spec.type, spec.type), Field(spec.default, description=spec.help or None, **spec.bounds))
        if spec.check is not None:
            validators[f"_check_{spec.name}"] = field_validator(spec.name, mode="before")(_check_before(spec.check))
    return create_model(
        f"{strategy.__name__}Options",
        __base__=_Strict, __doc__=strategy.options_type.__doc__, __validators__=validators, **fields,
    )


_CONFIG_MODELS: dict[tuple[Any, ...], type["Config"]] = {}


def config_model() -> type["Config"]:
    """Config with an ``influence.<name>`` section per registered strategy with options."""
    from influence_cli.engine import STRATEGIES

    specs = [(name, cls) for name, cls in STRATEGIES.items() if cls.options_type is not None]
    key = tuple((name, cls.options_type) for name, cls in specs)
    model = _CONFIG_MODELS.get(key)
    if model is None:
        sections = {}
        for name, cls in specs:
            if name in InfluenceConfig.model_fields:
                raise ValueError(f"strategy {name!r} clashes with the influence.{name} setting; rename the strategy")
            section = _option_section(cls)
            sections[name] = (section, Field(default_factory=section))
        influence = create_model("InfluenceConfig", __base__=InfluenceConfig, **sections)
        model = create_model("Config", __base__=Config, influence=(influence, Field(default_factory=influence)))
        _CONFIG_MODELS[key] = model
    return model
