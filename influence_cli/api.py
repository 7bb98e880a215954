"""The Python API: audit your own model and data without writing YAML.

    import infl                      # or: from influence_cli.api import Auditor

    audit = infl.Auditor(model, train_loader, test_loader, strategy="ekfac")
    table = audit.self_influence()   # pandas DataFrame, the CLI's self_influence.csv columns
    scores = audit.score(test_inputs, test_labels, top=10)   # `infl score`'s columns
    audit.report("report.html")

It is a thin front of the same app stages the CLI runs (``app.scores.run_self_influence``,
``app.explain.score_queries``, ``app.gate.run_report``): the data go through the
``data.source: factory`` path, the model is used as given (never trained), factors are
fitted once and kept in ``output_dir``. So the API and the CLI on the same data and
checkpoint give the same numbers (tests/test_api.py checks it).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler, TensorDataset

from influence_cli.errors import DataError

__all__ = ["Auditor"]

Data = Union[Dataset, DataLoader, tuple]


def as_dataset(data: Data, what: str) -> tuple[Dataset, dict[str, int]]:
    """(Dataset, the loader's batch_size / num_workers) of a Dataset, an unshuffled DataLoader
    or an ``(inputs, labels)`` pair of tensors. A shuffling DataLoader is refused: its
    batches come in a new order every pass, so scores could not be matched to ids."""
    if isinstance(data, DataLoader):
        sampler = data.sampler
        if not isinstance(sampler, SequentialSampler) or data.batch_sampler is None:
            kind = type(sampler).__name__
            raise DataError(
                f"{what}: the DataLoader draws examples with {kind}, not in order (shuffle=True?), so the scores "
                "could not be matched to example ids; pass DataLoader(..., shuffle=False) or the Dataset itself"
            )
        settings = {"num_workers": int(data.num_workers)}
        if data.batch_size is not None:
            settings["batch_size"] = int(data.batch_size)
        return data.dataset, settings
    if isinstance(data, Dataset):
        return data, {}
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return TensorDataset(data[0], data[1]), {}
    raise DataError(f"{what}: expected a torch Dataset, a DataLoader or (inputs, labels) tensors, not {type(data).__name__}")


def state_hash(model: nn.Module) -> str:
    """Content hash of the model's parameters and buffers (names, dtypes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{array.dtype}{tuple(array.shape)}".encode())
        digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return digest.hexdigest()[:16]


class Auditor:
    """Influence audit of ``model`` on ``train_data``.

    train_data / test_data: a Dataset of ``(input, label, ...)`` items, a DataLoader
    with ``shuffle=False``, or ``(inputs, labels)`` tensors; without test_data the
    training data stands in for it (accuracy). ``class_names``, ``train_ids`` and
    ``test_ids`` default to "0".."C-1" and row numbers. The other arguments are the
    config's: ``strategy``, ``task`` ("classification" | "regression"), ``influence``
    settings (damping, fisher, modules, batch_size, dtype, device, num_workers, ...) as
    keyword arguments, ``flag`` = the audit.flag section as a dict, ``seed``
    (true-Fisher sampling), ``in_memory``. Files go to ``output_dir``/``name`` (a
    temporary folder by default).
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Data,
        test_data: Optional[Data] = None,
        *,
        strategy: str = "auto",
        task: Literal["classification", "regression"] = "classification",
        class_names: Optional[Sequence[str]] = None,
        train_ids: Optional[Sequence[Any]] = None,
        test_ids: Optional[Sequence[Any]] = None,
        flag: Optional[dict[str, Any]] = None,
        seed: int = 0,
        in_memory: Union[bool, str] = "auto",
        output_dir: Optional[Union[str, Path]] = None,
        name: str = "api",
        **influence: Any,
    ):
        from influence_cli.app.model import ready_state
        from influence_cli.app.session import Session
        from influence_cli.config import config_from_dict
        from influence_cli.data import finish
        from influence_cli.data.factory import source_from_parts
        from influence_cli.progress import Reporter

        train, loader_settings = as_dataset(train_data, "train_data")
        test = as_dataset(test_data, "test_data")[0] if test_data is not None else train
        for key, value in loader_settings.items():  # a DataLoader's batch size and workers, unless given
            influence.setdefault(key, value)
        if output_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="infl-api-")
            output_dir = self._tmp.name
        self.config = config_from_dict(
            {
                "name": name, "seed": seed, "task": task,
                "data": {"source": "factory", "factory": "influence_cli.api:Auditor", "in_memory": in_memory},
                "influence": {"strategy": strategy, **influence},
                "audit": {"flag": dict(flag or {})},
                "output": {"dir": str(output_dir)},
            },
            label="Auditor",
        )
        self.strategy = strategy
        parts = {"train": train, "test": test, "class_names": class_names, "train_ids": train_ids, "test_ids": test_ids}
        datasets = finish(source_from_parts(parts, self.config), self.config)
        self.session = Session(self.config, Reporter(), datasets=datasets)
        self.model = model
        self.session.model_state = ready_state(self.session, model, state_hash(model))

    @property
    def data(self) -> Any:
        """The train/test ExampleSets (ids, labels, inputs) the audit uses."""
        return self.session.data()

    def self_influence(self) -> Any:
        """Self-influence of every training example, ranked and flagged: a DataFrame with
        the columns of the CLI's self_influence.csv (also written to ``output_dir``)."""
        from influence_cli.app.scores import run_self_influence

        return run_self_influence(self.session, self.strategy).table

    def score(
        self, queries: Data, labels: Optional[torch.Tensor] = None, *, top: int = 10, measurement: str = "loss",
        ids: Optional[Sequence[Any]] = None,
    ) -> Any:
        """The ``top`` most helpful (proponent) and harmful (opponent) training examples
        for each query: a DataFrame in `infl score`'s columns. ``queries``: inputs
        (a tensor, with ``labels`` or measured against the predicted class), or a
        Dataset/DataLoader of (input, label) items."""
        from influence_cli.app.explain import score_queries
        from influence_cli.data.queries import QueryRows

        if isinstance(queries, torch.Tensor):
            inputs = queries.float()
            given = torch.full((len(inputs),), -1, dtype=torch.long) if labels is None else torch.as_tensor(labels).long()
        else:
            dataset, _ = as_dataset(queries, "queries")
            items = [dataset[i] for i in range(len(dataset))]
            inputs = torch.stack([torch.as_tensor(item[0]).float() for item in items])
            given = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
        if len(given) != len(inputs):
            raise DataError(f"score: {len(inputs)} queries but {len(given)} labels")
        rows = QueryRows(inputs, given, [str(i) for i in (ids if ids is not None else range(len(inputs)))], "api")
        return score_queries(self.session, rows, top=top, strategy=self.strategy, measurement=measurement).table

    def report(self, path: Union[str, Path] = "report.html", *, top: int = 50) -> Path:
        """Write the self-contained HTML gallery of the top suspects to ``path``."""
        from influence_cli.app.gate import run_report

        written, _ = run_report(self.session, strategy=self.strategy, top=top, path=Path(path))
        return Path(written)
