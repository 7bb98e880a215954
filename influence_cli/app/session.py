"""One command's session: config, run directory, data, reporter; ensemble members."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from influence_cli.app.shard_files import refuse_ensemble
from influence_cli.config import Config
from influence_cli.distributed import DistContext, current
from influence_cli.errors import InflError
from influence_cli.progress import Reporter
from influence_cli.run import (
    RunDir,
    hash_object,
    influence_hash,
    training_hash,
)


@dataclass
class ModelState:
    """A ready model plus what later stages need to know about it."""

    model: nn.Module
    checkpoint_hash: str
    trained_now: bool
    train_accuracy: float
    test_accuracy: float
    info: dict[str, Any] = field(default_factory=dict)
    # Softmax outputs on the train and test splits, computed once for the accuracies and
    # reused by the ranking (a second forward pass over the data costs as much again).
    probs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Shard:
    """``--shard i/n``: this job does block ``index`` of ``count`` of the training set.

    A property of the session, not a second pipeline: the normal stages (ensure_factors,
    run_self_influence, run_score) restrict the training rows to the block and write the
    partial result (app/shard_files.py) instead of the final output; `infl merge` combines.
    """

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class Session:
    """Everything loaded for one command: config, run directory, data, reporter.

    ``member`` k >= 1 is the k-th extra model of an ensemble (``influence.ensemble``): same
    data, its own seed (seed + k) or checkpoint, its own run directory. ``shard``: this
    command is one ``--shard i/n`` job (a single model: ensembles are refused).
    """

    config: Config
    reporter: Reporter
    run: RunDir = field(init=False)
    datasets: Any = None
    member: int = 0
    dist: DistContext = field(default_factory=current)
    shard: Optional[Shard] = None
    # A model the caller already holds (the Python API): used as it is, never trained.
    model_state: Optional["ModelState"] = None

    def __post_init__(self) -> None:
        self.run = RunDir(self.config, self.member)
        if self.shard is not None:
            refuse_ensemble(self)

    @property
    def model_seed(self) -> int:
        """Seeds initial weights, shuffling and Fisher sampling (not the data split)."""
        return int(self.config.seed) + self.member

    def data(self) -> Any:
        if self.datasets is None:
            from influence_cli.data import build_datasets
            from influence_cli.data.cache import load_datasets

            self.datasets = load_datasets(
                self.config, self.run.root / "cache", build_datasets, write=self.dist.is_main
            )
        return self.datasets

    def data_fingerprint(self) -> str:
        """Content hash of the training split this command uses (cache keys include it)."""
        return self.data().fingerprint("train")

    def influence_hash(self, strategy: str) -> str:
        return influence_hash(self.config, strategy, self.data_fingerprint())

    def factors_want(self, state: "ModelState", strategy: str) -> dict[str, Any]:
        """What stored factors must have been fitted for: this checkpoint, settings and data."""
        return {
            "checkpoint_hash": state.checkpoint_hash,
            "influence_hash": self.influence_hash(strategy),
            "data": self.data().data_identity(),
        }


def member_checkpoint(config: Config, member: int) -> Optional[str]:
    """The user checkpoint of an ensemble member, or None when the member is trained."""
    if isinstance(config.influence.ensemble, list):
        return config.influence.ensemble[member]
    return config.model.checkpoint if member == 0 else None


def member_training_hash(config: Config, member: int, data_fingerprint: str) -> str:
    base = training_hash(config, data_fingerprint)
    return base if member == 0 else hash_object({"training_hash": base, "ensemble_member": member})


def ensemble_sessions(session: Session) -> list[Session]:
    """The sessions of every ensemble member (member 0 is ``session`` itself); they share
    the data and the reporter."""
    config = session.config
    size = config.influence.ensemble_size()
    if size > 1 and isinstance(config.influence.ensemble, int) and config.model.checkpoint:
        raise InflError(
            f"{config.source_file}: influence.ensemble: {size} trains {size} models, which cannot be combined "
            "with model.checkpoint; list the checkpoints instead (influence.ensemble: [a.pt, b.pt, ...])"
        )
    if session.member != 0:
        return [session]
    data = session.data()
    members = [session]
    for k in range(1, size):
        members.append(Session(config, session.reporter, datasets=data, member=k))
    return members
