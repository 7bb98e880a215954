"""The experiment config schema: every section, field, type, default and valid range as pydantic models.

Why pydantic: one place declares every field, its type and default, and unknown keys are
rejected, so a typo in a config fails loudly instead of being silently ignored. Errors
are collected and reported all at once as ``<file>: <dotted.path>: <message>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, field_validator, model_validator

from influence_cli.config.data_section import (  # noqa: F401  (re-exported: the schema's one namespace)
    TORCHVISION_SOURCES,
    DataConfig,
    LabelNoiseConfig,
    SyntheticConfig,
)
from influence_cli.config.types import MAX_SEED, Float, Int, Seed, Size, _not_bool, _Strict, check_factory  # noqa: F401

DEFAULT_CONFIG = "digits-mlp"

BUILTIN_ARCHS = ("mlp", "cnn", "factory", "hf")


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's classification models (imports torchvision: only called for
    an arch that is not built in)."""
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


class ModelConfig(_Strict):
    arch: str = Field("mlp", description="mlp, cnn, a torchvision model name (resnet18, ...), factory, or hf")
    hidden_sizes: list[Size] = Field(
        default_factory=lambda: [128], description="mlp hidden layer widths; [] = no hidden layer (logistic regression)"
    )
    channels: list[Size] = Field(default_factory=lambda: [32, 64], min_length=1, description="cnn conv channels (at least one layer)")
    factory: Optional[str] = Field(None, description="'package.module:function' returning an nn.Module")
    factory_path: Optional[str] = Field(None, description="folder put on sys.path before importing the factory")
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Optional[str] = Field(None, description="load this state_dict (.safetensors, .pt, .pth) instead of training")
    name_or_path: Optional[str] = Field(None, description="hf: folder of a saved Hugging Face sequence classifier and its tokenizer")
    allow_download: bool = Field(False, description="hf: let transformers download name_or_path from the hub (default: local files only)")
    fine_tune: bool = Field(True, description="hf: fine-tune the loaded model with the train section (false: audit its weights as they are)")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value in BUILTIN_ARCHS:
            return value
        names = torchvision_classifiers()
        if value not in names:
            import difflib

            close = difflib.get_close_matches(value, [*BUILTIN_ARCHS, *names], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"unknown architecture '{value}'{hint}; use mlp, cnn, factory or a torchvision classification "
                "model such as resnet18"
            )
        return value

    @model_validator(mode="after")
    def _factory_given(self) -> "ModelConfig":
        if self.arch == "hf" and not self.name_or_path:
            raise ValueError("arch 'hf' needs model.name_or_path: the folder of a saved Hugging Face model")
        if self.name_or_path and self.arch != "hf":
            raise ValueError("model.name_or_path is set: also set model.arch: hf")
        check_factory("model", "arch", self.arch, self.factory)
        return self


class TrainConfig(_Strict):
    epochs: Int = Field(30, ge=1)
    batch_size: Int = Field(64, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Float = Field(1e-3, gt=0.0)
    momentum: Float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: Float = Field(0.0, ge=0.0)
    device: str = "auto"


class InfluenceConfig(_Strict):
    strategy: str = Field(
        "auto", description="auto (exact up to influence.exact.max_params tracked parameters, else ekfac) or a strategy name"
    )
    damping: Union[float, str] = Field(
        "auto", description="'auto' (damping_factor x the mean curvature eigenvalue), 'tuned' (the factor "
        "`infl evaluate --lds --tune-damping` measured best, runs/<name>/damping.json) or a number"
    )
    damping_factor: Optional[Float] = Field(
        None, gt=0.0,
        description="damping: auto = this factor x the mean curvature eigenvalue; null = the strategy's measured "
        "default (0.1; exact and lissa 3)",
    )
    damping_scope: Literal["global", "layer"] = Field(
        "global", description="damping: auto averages the eigenvalues of every layer (global: one lambda) or of each layer (layer)"
    )
    ensemble: Union[int, list[str]] = Field(
        1, description="K models trained with seeds seed..seed+K-1, or a list of checkpoints; scores are averaged"
    )
    fisher: Literal["true", "empirical"] = "true"
    modules: Optional[list[str]] = Field(None, description="fnmatch patterns of layer names to track")
    device: str = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    batch_size: Int = Field(256, ge=1)
    amp: Optional[Literal["bfloat16", "float16"]] = Field(
        None, description="autocast the model's forward/backward (GPU); factors and scores accumulate in float32"
    )
    num_workers: Int = Field(0, ge=0, description="DataLoader worker processes for sources that are not in-memory tensors")
    query_rank: Int = Field(
        0, ge=0,
        description="pairwise scores: 0 = exact; k > 0 = an approximation that truncates each layer's preconditioned "
        "query gradient to rank k (faster on wide layers; docs/performance.md)",
    )

    @field_validator("damping", mode="before")
    @classmethod
    def _damping(cls, value: Any) -> Union[str, float]:
        if value in ("auto", "tuned"):
            return value
        wrong = "must be 'auto' or a number >= 0, or 'tuned' (the factor infl evaluate --lds --tune-damping measured)"
        if isinstance(value, bool):
            raise ValueError(wrong)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(wrong) from None
        if not 0 <= number < float("inf"):  # also refuses nan
            raise ValueError(wrong)
        return number

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _check_device(value)

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        from influence_cli.engine import strategy_names

        names = ["auto", *strategy_names()]
        if value not in names:
            import difflib

            close = difflib.get_close_matches(value, names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown strategy '{value}'{hint}; use one of {', '.join(names)}")
        return value

    @field_validator("modules")
    @classmethod
    def _modules(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None and not value:
            raise ValueError("the list is empty, so no layer would be tracked; use null to track every Linear and Conv2d")
        return value

    @field_validator("ensemble", mode="before")
    @classmethod
    def _ensemble(cls, value: Any) -> Union[int, list[str]]:
        # before pydantic's union, so a bad value gets one message in the config's terms
        wrong = "must be a number of models >= 1 or a list of checkpoint paths"
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError(wrong)
        elif isinstance(value, list):
            if not value:
                raise ValueError("the checkpoint list is empty; give at least one path or a number of models")
            if not all(isinstance(item, str) and item for item in value):
                raise ValueError("every entry of the checkpoint list must be a file path")
        else:
            raise ValueError(wrong)
        return value

    def ensemble_size(self) -> int:
        return self.ensemble if isinstance(self.ensemble, int) else len(self.ensemble)

    def strategy_options(self, strategy: str) -> Optional[dict[str, Any]]:
        """The strategy's own settings (the ``influence.<strategy>`` section), None when
        it declares none."""
        if strategy in InfluenceConfig.model_fields or strategy not in type(self).model_fields:
            return None
        return getattr(self, strategy).model_dump(mode="python")


class FlagConfig(_Strict):
    """Which training examples get flagged as suspects (see README, "Flagging rule")."""

    rule: Literal["mad", "top_fraction"] = "mad"
    k: Float = Field(1.5, ge=0.0, description="mad: flag when log self-influence is more than k robust standard deviations above the median")
    fraction: Float = Field(0.02, gt=0.0, le=1.0, description="top_fraction: flag this share of the ranking")
    require_disagreement: bool = Field(True, description="only flag examples whose given label is not the model's choice")


class CheckConfig(_Strict):
    max_flagged_fraction: Optional[Float] = Field(None, ge=0.0, le=1.0)
    max_flagged: Optional[Int] = Field(None, ge=0)


class AuditConfig(_Strict):
    top: Int = Field(20, ge=1)
    score: Literal["self_influence", "loss", "margin", "loo_loss", "relabel_gain", "loo_margin", "loo_margin_sm"] = Field(
        "loo_margin_sm", description="what ranks and flags the suspects (README: Mislabel scores); self_influence is always in the CSV"
    )
    flag: FlagConfig = Field(default_factory=FlagConfig)
    check: CheckConfig = Field(default_factory=CheckConfig)


class OutputConfig(_Strict):
    dir: str = Field("runs", description="parent folder of run directories; a run lives in <dir>/<name>")


#: Config keys that name where files are (resolved against the config's folder), not what they hold.
PATH_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("root", "path", "train_path", "test_path", "factory_path", "label_overrides"),
    "model": ("checkpoint", "factory_path", "name_or_path"),
}


class Config(_Strict):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    seed: Seed = 0
    task: Literal["classification", "regression"] = Field(
        "classification", description="classification (cross-entropy) or regression (squared error; table and "
        "factory sources, numeric labels; the audit flags outliers, with no suggested label)"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    influence: InfluenceConfig = Field(default_factory=InfluenceConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    # Where relative paths in the config are resolved (set by load_config, not by YAML).
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)
    source_file: str = Field("<config>", exclude=True)

    @field_validator("train")
    @classmethod
    def _train_device(cls, value: TrainConfig) -> TrainConfig:
        _check_device(value.device)
        return value

    @model_validator(mode="after")
    def _text_needs_hf_model(self) -> "Config":
        if self.data.source == "hf_dataset" and self.model.arch != "hf":
            raise ValueError(
                "data.source hf_dataset is tokenised with the model's tokenizer: set model.arch: hf and model.name_or_path"
            )
        return self

    @model_validator(mode="after")
    def _one_checkpoint_source(self) -> "Config":
        if isinstance(self.influence.ensemble, list) and self.model.checkpoint:
            raise ValueError(
                "influence.ensemble lists checkpoints and model.checkpoint is set too; "
                "put every checkpoint in influence.ensemble and remove model.checkpoint"
            )
        return self

    @model_validator(mode="after")
    def _task_fits_source(self) -> "Config":
        if self.task == "regression":
            if self.data.source not in ("table", "factory"):
                raise ValueError(
                    f"task: regression reads numeric labels from data.source table or factory, not "
                    f"'{self.data.source}'; use one of those or task: classification"
                )
            if self.data.label_noise.fraction > 0:
                raise ValueError("data.label_noise flips class labels; it does not apply to task: regression (set fraction: 0)")
        return self

    def resolve_path(self, path: str | Path) -> Path:
        """Resolve a path from the config against the config's own folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def resolved_dump(self) -> dict[str, Any]:
        """The config as plain data with every path made absolute (data and model paths,
        the checkpoint list, output.dir): what a copy saved in a run folder needs to replay
        from anywhere, and what the decoded-data cache keys on."""
        dumped = self.model_dump(mode="json")
        for section, keys in PATH_KEYS.items():
            for key in keys:
                if dumped[section].get(key):
                    path = self.resolve_path(dumped[section][key])
                    if key != "name_or_path" or path.exists():  # a hub model name stays a name
                        dumped[section][key] = str(path.resolve())
        if isinstance(dumped["influence"]["ensemble"], list):
            dumped["influence"]["ensemble"] = [str(self.resolve_path(p).resolve()) for p in dumped["influence"]["ensemble"]]
        dumped["output"]["dir"] = str(Path(dumped["output"]["dir"]).expanduser().resolve())
        return dumped

    def to_replay_yaml(self) -> str:
        """YAML of :meth:`resolved_dump` (``infl self-influence -c runs/<name>/config.yaml``)."""
        return yaml.safe_dump(self.resolved_dump(), sort_keys=False)


def _check_device(value: str) -> str:
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError("must be auto, cpu, cuda or cuda:N")
