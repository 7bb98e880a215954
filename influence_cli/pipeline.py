"""The stages behind every command: data → model → factors → scores → reports.

Each function does the earlier stages it needs when their outputs are missing, reuses
outputs that are still valid (by content hash) and never trusts stale ones. The CLI calls
exactly one of these per command and renders what it returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from influence_cli import __version__
from influence_cli.config import Config
from influence_cli.errors import FactorsError, InflError
from influence_cli.loaders import BatchLoader
from influence_cli.models import build_model, load_checkpoint, save_checkpoint
from influence_cli.progress import Reporter
from influence_cli.run import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    hash_file,
    influence_hash,
    read_json,
    training_hash,
)
from influence_cli.training import accuracy, predict_probs, resolve_device, train_model


@dataclass
class ModelState:
    """A ready model plus what later stages need to know about it."""

    model: nn.Module
    checkpoint_hash: str
    trained_now: bool
    train_accuracy: float
    test_accuracy: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Session:
    """Everything loaded for one command: config, run directory, data, reporter."""

    config: Config
    reporter: Reporter
    run: RunDir = field(init=False)
    datasets: Any = None

    def __post_init__(self) -> None:
        self.run = RunDir(self.config)

    def data(self) -> Any:
        if self.datasets is None:
            from influence_cli.data import build_datasets

            self.datasets = build_datasets(self.config)
        return self.datasets


# ----------------------------------------------------------------------------- model


def ensure_model(session: Session, *, retrain: bool = False) -> ModelState:
    """Load the user's checkpoint, reuse a valid trained one, or train and save a new one."""
    config, run, reporter = session.config, session.run, session.reporter
    data = session.data()
    num_classes = len(data.class_names)
    model = build_model(config.model, tuple(data.input_shape), num_classes, seed=config.seed)
    device = resolve_device(config.train.device)
    trained_now = False
    info: dict[str, Any] = {}
    if config.model.checkpoint:
        path = config.resolve_path(config.model.checkpoint)
        load_checkpoint(model, path)
        checkpoint_hash = hash_file(path)
        info["checkpoint"] = str(path)
    else:
        meta = read_json(run.train_meta)
        want = training_hash(config)
        valid = (
            not retrain
            and meta is not None
            and meta.get("training_hash") == want
            and run.checkpoint.is_file()
            and meta.get("checkpoint_hash") == hash_file(run.checkpoint)
        )
        if valid:
            load_checkpoint(model, run.checkpoint)
            checkpoint_hash = meta["checkpoint_hash"]  # type: ignore[index]
            info = dict(meta)  # type: ignore[arg-type]
        else:
            run.ensure()
            stats = train_model(model, data.train, config.train, seed=config.seed, device=device, reporter=reporter)
            model.cpu()
            save_checkpoint(model, run.checkpoint)
            checkpoint_hash = hash_file(run.checkpoint)
            trained_now = True
            info = {"training_hash": want, "checkpoint_hash": checkpoint_hash, **stats}
    model.eval()
    train_probs = predict_probs(model, data.train)
    test_probs = predict_probs(model, data.test)
    train_acc = accuracy(train_probs, data.train.labels)
    test_acc = accuracy(test_probs, data.test.labels)
    if trained_now:
        info.update({"train_accuracy": train_acc, "test_accuracy": test_acc, "version": __version__})
        atomic_write_json(run.train_meta, info)
        atomic_write_text(run.resolved_config, config.to_yaml())
    return ModelState(model, checkpoint_hash, trained_now, train_acc, test_acc, info)


# ----------------------------------------------------------------------------- factors


def influence_device(config: Config) -> torch.device:
    return resolve_device(config.influence.device)


def influence_dtype(config: Config) -> torch.dtype:
    return torch.float64 if config.influence.dtype == "float64" else torch.float32


@dataclass
class FactorsState:
    factors: Any
    reused: bool
    seconds: float
    directory: Any


def ensure_factors(session: Session, state: ModelState, strategy: str, *, overwrite: bool = False) -> FactorsState:
    """Reuse valid stored factors, refuse stale ones (unless ``overwrite``), or fit new ones."""
    from influence_cli.influence.factors import Factors, fit_factors

    config, run, reporter = session.config, session.run, session.reporter
    directory = run.factors_dir(strategy)
    want = {"checkpoint_hash": state.checkpoint_hash, "influence_hash": influence_hash(config, strategy)}
    if directory.exists() and not overwrite:
        meta = Factors.read_meta(directory) if (directory / "meta.json").is_file() else None
        if meta is None:
            raise FactorsError(f"{directory}: incomplete or unreadable factors; rerun with --overwrite to refit")
        if meta.get("checkpoint_hash") != want["checkpoint_hash"]:
            raise FactorsError(
                f"{directory}: factors were fitted for a different checkpoint; rerun with --overwrite to refit"
            )
        if meta.get("influence_hash") != want["influence_hash"]:
            raise FactorsError(
                f"{directory}: factors were fitted with different data or influence settings; rerun with --overwrite to refit"
            )
        start = time.perf_counter()
        factors = Factors.load(directory)
        return FactorsState(factors, True, time.perf_counter() - start, directory)
    data = session.data()
    device = influence_device(config)
    loader = BatchLoader(data.train, config.influence.batch_size)
    damping: Any = config.influence.damping
    start = time.perf_counter()
    with reporter.stages(len(data.train)) as on_batch:
        factors = fit_factors(
            state.model,
            loader,
            strategy,
            damping=damping,
            fisher=config.influence.fisher,
            modules=config.influence.modules,
            device=device,
            dtype=influence_dtype(config),
            seed=config.seed,
            on_batch=on_batch,
        )
    seconds = time.perf_counter() - start
    run.ensure()
    factors.save(directory, extra_meta={**want, "config_name": config.name, "fit_seconds": seconds})
    state.model.cpu()
    return FactorsState(factors, False, seconds, directory)


# ----------------------------------------------------------------------------- self-influence


@dataclass
class SelfInfluenceResult:
    table: Any  # pandas DataFrame in the output contract's columns
    summary: dict[str, Any]
    seconds: float
    model_state: ModelState
    factors_state: FactorsState


def run_self_influence(session: Session, strategy: Optional[str] = None, *, overwrite: bool = False) -> SelfInfluenceResult:
    """Self-influence of every training example, ranked and flagged; writes the CSVs."""
    from influence_cli.audit.ranking import build_ranking, class_summary
    from influence_cli.audit.report import write_csv, write_json
    from influence_cli.influence.scores import self_influence

    config, run, reporter = session.config, session.run, session.reporter
    strategy = strategy or config.influence.strategy
    start = time.perf_counter()
    state = ensure_model(session)
    fstate = ensure_factors(session, state, strategy, overwrite=overwrite)
    data = session.data()
    device = influence_device(config)
    loader = BatchLoader(data.train, config.influence.batch_size)
    with reporter.stages(len(data.train)) as on_batch:
        scores = self_influence(state.model, fstate.factors, loader, device=device, on_batch=on_batch)
    state.model.cpu()
    scores_np = scores.detach().cpu().double().numpy()
    if not np.all(np.isfinite(scores_np)):
        raise InflError("self-influence produced non-finite values: set influence.damping to a larger number")
    probs = predict_probs(state.model, data.train).double().numpy()
    table = build_ranking(
        scores_np, data.train.labels.numpy(), probs, list(data.train.ids), list(data.class_names), config.audit.flag
    )
    summary = class_summary(table, list(data.class_names))
    seconds = time.perf_counter() - start
    summary["run"] = {
        "name": config.name,
        "strategy": strategy,
        "examples": int(len(table)),
        "flagged": int(table["flagged"].sum()),
        "seconds": round(seconds, 3),
        "train_accuracy": state.train_accuracy,
        "test_accuracy": state.test_accuracy,
        "flag_rule": config.audit.flag.model_dump(mode="json"),
    }
    run.ensure()
    write_csv(table, run.self_influence_csv)
    write_csv(table[table["flagged"]], run.mislabels_csv)
    write_json(summary, run.summary_json)
    return SelfInfluenceResult(table, summary, seconds, state, fstate)
