"""Data layer: every source behind one ``build_datasets(config)``; label-noise injection.

Sources (data.source) and their example ids:

- ``digits``: scikit-learn's 8x8 digits; id = row number in ``load_digits()``.
- ``mnist``, ``fashion_mnist``, ``cifar10``: torchvision's on-disk files under data.root;
  official train/test splits; id = row number within its split.
- ``image_folder``: <folder>/<class>/<image>; id = path relative to the folder (posix).
- ``csv_manifest``: CSV with path,label; id = the path cell as written.
- ``table``: numeric CSV; id = data.id_column value, else the 0-based data row number.
- ``synthetic``: seeded Gaussian clusters; id = row number within its split.
"""

from .build import SOURCES, build_datasets, finish
from .dataset import Datasets, DisplayItem, ExampleSet, LabelNoise, SourceData
from .noise import class_derangement, inject_label_noise

__all__ = [
    "SOURCES",
    "Datasets",
    "DisplayItem",
    "ExampleSet",
    "LabelNoise",
    "SourceData",
    "build_datasets",
    "class_derangement",
    "finish",
    "inject_label_noise",
]
