"""The ``data:`` section of the config: where the examples come from and how they are read."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from influence_cli.config.types import Float, Int, Seed, Size, _Strict, check_factory

class LabelNoiseConfig(_Strict):
    """Flip a fraction of the training labels on purpose, to evaluate detection."""

    fraction: Float = Field(0.0, ge=0.0, le=1.0)
    kind: Literal["uniform", "class_conditional"] = "uniform"
    seed: Seed = 0


class SyntheticConfig(_Strict):
    """Seeded classification data of any input shape (tests and benchmarks)."""

    num_train: Int = Field(1000, ge=1)
    num_test: Int = Field(200, ge=1)
    shape: list[Size] = Field(default_factory=lambda: [20], min_length=1, description="input shape, e.g. [20] or [3, 32, 32]")
    num_classes: Int = Field(10, ge=2)
    separation: Float = Field(2.0, ge=0.0, description="distance between class means, in noise std units")


TORCHVISION_SOURCES = ("mnist", "fashion_mnist", "cifar10")


class DataConfig(_Strict):
    source: Literal[
        "digits", "mnist", "fashion_mnist", "cifar10", "image_folder", "csv_manifest", "table", "synthetic", "factory",
        "hf_dataset",
    ] = "digits"
    root: Optional[str] = Field(None, description="folder of torchvision datasets (mnist, fashion_mnist, cifar10)")
    download: bool = Field(False, description="let torchvision download the dataset into root")
    path: Optional[str] = Field(None, description="image folder, CSV manifest or table (CSV or parquet) holding all examples")
    train_path: Optional[str] = Field(None, description="separate training folder/file (with test_path)")
    test_path: Optional[str] = Field(None, description="separate test folder/file (with train_path)")
    test_fraction: Float = Field(0.2, gt=0.0, lt=1.0, description="stratified, seeded test split when one path is given")
    label_column: str = "label"
    text_column: str = Field("text", description="hf_dataset: the column holding the text")
    max_length: Int = Field(128, ge=2, description="hf_dataset: tokens per text (padded/truncated with the model's tokenizer)")
    id_column: Optional[str] = None
    feature_columns: Optional[list[str]] = None
    image_size: Optional[list[Int]] = Field(None, description="[height, width] to resize images to")
    grayscale: bool = False
    standardize: bool = True
    limit: Optional[Int] = Field(None, ge=1, description="use only the first N training examples")
    factory: Optional[str] = Field(
        None, description="source 'factory': 'package.module:function' returning a torch Dataset of (input, label) "
        "items, a (train, test) pair or a dict (train, test, class_names, train_ids, test_ids)"
    )
    factory_path: Optional[str] = Field(None, description="folder put on sys.path before importing data.factory")
    factory_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for data.factory")
    in_memory: Union[bool, Literal["auto"]] = Field(
        "auto", description="decode every input into memory (true), or per batch through a DataLoader with "
        "influence.num_workers (false: memory bounded by the batch); auto: false above 1 GiB of decoded inputs "
        "(image_folder, csv_manifest, factory)"
    )
    categorical_columns: Optional[list[str]] = Field(
        None, description="table: columns one-hot encoded (categories sorted, taken from the training rows; "
        "an unseen category encodes as all zeros); null = none"
    )
    cache: bool = Field(
        True, description="keep the decoded splits in runs/<name>/cache/ (digits, table, image_folder, csv_manifest) "
        "so later commands skip decoding; rebuilt when a source file changes"
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    label_noise: LabelNoiseConfig = Field(default_factory=LabelNoiseConfig)
    label_overrides: Optional[str] = Field(
        None, description="CSV of id,label rows replacing those training labels (after label_noise); "
        "`infl fix --action relabel` writes one"
    )

    @field_validator("image_size")
    @classmethod
    def _two_sizes(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        if value is not None and (len(value) != 2 or min(value) < 1):
            raise ValueError("must be [height, width] with positive integers")
        return value

    @field_validator("feature_columns")
    @classmethod
    def _feature_columns(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None:
            if not value:
                raise ValueError("the list is empty; name at least one column, or use null for every other column")
            repeated = sorted({c for c in value if value.count(c) > 1})
            if repeated:
                raise ValueError(f"column '{repeated[0]}' is listed twice; list every column once")
        return value

    @model_validator(mode="after")
    def _paths_fit_source(self) -> "DataConfig":
        file_sources = {"image_folder", "csv_manifest", "table", "hf_dataset"}
        check_factory("data", "source", self.source, self.factory)
        if self.source in TORCHVISION_SOURCES and self.root is None:
            raise ValueError(
                f"source '{self.source}' needs data.root: the folder holding the dataset "
                "(with data.download: true it is downloaded there)"
            )
        if self.id_column is not None and self.id_column == self.label_column:
            raise ValueError(f"data.id_column and data.label_column are both '{self.label_column}'; use two different columns")
        if self.feature_columns and (self.label_column in self.feature_columns or self.id_column in self.feature_columns):
            column = self.label_column if self.label_column in self.feature_columns else self.id_column
            raise ValueError(f"data.feature_columns lists '{column}', the label/id column; remove it from feature_columns")
        if self.source in file_sources:
            if (self.train_path is None) != (self.test_path is None):
                raise ValueError("give both train_path and test_path, or path with test_fraction")
            if self.path is None and self.train_path is None:
                raise ValueError(f"source '{self.source}' needs data.path (or data.train_path and data.test_path)")
        return self
