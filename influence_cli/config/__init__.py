"""Experiment configuration: the YAML schema as pydantic models (schema.py; the per-strategy
``influence.<name>`` sections built from the registry in sections.py), and loading,
overrides and one-line error messages (loading.py).

Why pydantic: one place declares every field, its type, default and valid range, and unknown
keys are rejected, so a typo in a config fails loudly instead of being silently ignored.
"""

from __future__ import annotations

from influence_cli.config.schema import (  # noqa: F401
    PATH_KEYS,
    DEFAULT_CONFIG,
    MAX_SEED,
    _not_bool,
    Int,
    Float,
    Size,
    Seed,
    _Strict,
    LabelNoiseConfig,
    SyntheticConfig,
    TORCHVISION_SOURCES,
    DataConfig,
    BUILTIN_ARCHS,
    torchvision_classifiers,
    ModelConfig,
    TrainConfig,
    InfluenceConfig,
    FlagConfig,
    CheckConfig,
    AuditConfig,
    OutputConfig,
    Config,
    _check_device,
)
from influence_cli.config.sections import (  # noqa: F401
    _check_before,
    _option_section,
    _CONFIG_MODELS,
    config_model,
)
from influence_cli.config.loading import (  # noqa: F401
    bundled_configs,
    bundled_summary,
    find_config,
    parse_override,
    apply_overrides,
    _BOUNDS,
    _shown,
    _message,
    _format_errors,
    config_from_dict,
    load_config,
)
