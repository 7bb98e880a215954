"""The LDS retrainings: one fresh model per (subset, seed), measured on the test rows and
cached in ``runs/<name>/lds/<key>.json`` (see :mod:`.lds` for the recipe).

The cache key is a hash of (training hash of the config, subset indices, seed,
measurement, test rows, test rows' fingerprint); each file is sealed with its content
hash, so an interrupted run resumes and a truncated or damaged file is retrained. Under
torchrun the jobs are dealt out to the ranks (job j on rank j mod world); each rank writes
its results to the cache, and after a barrier every rank reads them all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from influence_cli.engine.batches import forward_logits
from influence_cli.errors import InflError
from influence_cli.models import build_model
from influence_cli.progress import Reporter
from influence_cli.run import atomic_write_json, hash_object, is_sealed, read_json, seal
from influence_cli.training import resolve_device, train_model

__all__ = ["subset_indices", "retrain_seed", "measure", "train_subset", "RetrainingPlan", "Retrained", "run_retrainings"]


def subset_indices(seed: int, r: int, n: int, size: int) -> np.ndarray:
    """Sorted indices of subset r (independent of how many subsets are drawn)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x1D5, int(r)])
    return np.sort(rng.permutation(n)[:size]).astype(np.int64)


def retrain_seed(seed: int, r: int, s: int) -> int:
    return int(seed) + 1000 * (int(r) + 1) + int(s)


@torch.no_grad()
def measure(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, measurement: str) -> np.ndarray:
    """Per-row loss (cross-entropy) or margin (logit_y − logsumexp of the other logits)."""
    model.eval()
    device = next(model.parameters()).device
    logits = torch.cat([forward_logits(model, inputs[i : i + 512].to(device)).double().cpu() for i in range(0, len(inputs), 512)])
    labels = labels.long()
    if measurement == "loss":
        return F.cross_entropy(logits, labels, reduction="none").numpy()
    correct = logits.gather(1, labels[:, None]).squeeze(1)
    is_label = torch.arange(logits.shape[1]) == labels[:, None]
    others = logits.masked_fill(is_label, float("-inf"))
    return (correct - torch.logsumexp(others, dim=1)).numpy()


def train_subset(config: Any, data: Any, indices: np.ndarray, seed: int, device: Any) -> torch.nn.Module:
    """A fresh model trained with the config's recipe on ``data.train.subset(indices)`` (on CPU after)."""
    model = build_model(config.model, tuple(data.input_shape), len(data.class_names), seed=seed, base_dir=config.base_dir)
    # a quiet reporter: train_model's own bar would nest inside the caller's
    train_model(model, data.train.subset(indices), config.train, seed=seed, device=device, reporter=Reporter())
    return model.cpu()


@dataclass
class RetrainingPlan:
    """What to retrain and where its results are cached."""

    config: Any
    data: Any  # the run's Datasets
    subsets: int
    fraction: float
    seeds: int
    size: int  # round(fraction · N)
    measurement: str
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_ids: list[str]
    cache_dir: Path
    base_hash: str  # training hash of the config and data
    test_rows_hash: str

    def __post_init__(self) -> None:
        n = len(self.data.train)
        self.subset_idx = [subset_indices(self.config.seed, r, n, self.size) for r in range(self.subsets)]
        self.jobs = [(r, s) for r in range(self.subsets) for s in range(self.seeds)]
        self.device = resolve_device(self.config.train.device)

    def membership(self) -> np.ndarray:
        """(subsets, N) boolean mask of each subset's training examples."""
        out = np.zeros((self.subsets, len(self.data.train)), dtype=bool)
        for r, idx in enumerate(self.subset_idx):
            out[r, idx] = True
        return out

    def cache_path(self, r: int, s: int) -> Path:
        key = hash_object(
            {
                "training_hash": self.base_hash,
                "subset": self.subset_idx[r].tolist(),
                "seed": retrain_seed(self.config.seed, r, s),
                "measurement": self.measurement,
                "test_rows": self.test_ids,
                "test_rows_hash": self.test_rows_hash,
            }
        )
        return self.cache_dir / f"{key}.json"

    def cached(self, path: Path, reporter: Optional[Reporter] = None) -> tuple[Optional[np.ndarray], float]:
        """A finished retraining's measurements and recorded seconds; None when missing,
        truncated or damaged (said on ``reporter`` when the file exists)."""
        cached = read_json(path)
        values = cached.get("values") if cached and is_sealed(cached) else None
        rows = len(self.test_ids)
        if isinstance(values, list) and len(values) == rows and all(isinstance(v, (int, float)) for v in values):
            return np.asarray(values, dtype=np.float64), float(cached.get("train_seconds") or 0.0)
        if reporter is not None and path.exists():
            reporter.info(f"{path}: cached retraining is truncated or damaged; retraining it")
        return None, 0.0

    def retrain(self, r: int, s: int, path: Path) -> tuple[np.ndarray, float]:
        """Train subset r with seed s, measure the test rows, write the sealed cache file."""
        config, data = self.config, self.data
        seed = retrain_seed(config.seed, r, s)
        start = time.perf_counter()
        model = train_subset(config, data, self.subset_idx[r], seed, self.device)
        values = measure(model, self.test_x, self.test_y, self.measurement)
        elapsed = time.perf_counter() - start
        if not np.all(np.isfinite(values)):
            raise InflError(f"evaluate --lds: retraining on subset {r} gave non-finite {self.measurement}es; lower train.lr")
        record = {
            "subset": r,
            "seed": seed,
            "measurement": self.measurement,
            "training_hash": self.base_hash,
            "subset_size": self.size,
            "train_seconds": elapsed,
            "values": values.tolist(),
        }
        atomic_write_json(path, seal(record))
        return values, elapsed


@dataclass
class Retrained:
    measured: np.ndarray  # (subsets, seeds, test rows)
    trained_now: int = 0
    reused: int = 0
    seconds_now: float = 0.0
    seconds_total: float = 0.0  # including the recorded time of reused retrainings


def run_retrainings(plan: RetrainingPlan, dist: Any, reporter: Reporter) -> Retrained:
    """Every (subset, seed) measurement, retrained or read from the cache."""
    out = Retrained(np.zeros((plan.subsets, plan.seeds, len(plan.test_ids)), dtype=np.float64))
    done = np.zeros((plan.subsets, plan.seeds), dtype=bool)
    with reporter.task("retraining subsets", len(plan.jobs)) as advance:
        for j, (r, s) in enumerate(plan.jobs):
            if dist.active and j % dist.world_size != dist.rank:
                continue
            path = plan.cache_path(r, s)
            values, recorded = plan.cached(path, reporter)
            if values is not None:
                out.reused += 1
            else:
                values, recorded = plan.retrain(r, s, path)
                out.trained_now += 1
                out.seconds_now += recorded
            out.measured[r, s] = values
            out.seconds_total += recorded
            done[r, s] = True
            advance(dist.world_size if dist.active else 1)
    if dist.active:
        _gather_ranks(plan, dist, out, done)
    return out


def _gather_ranks(plan: RetrainingPlan, dist: Any, out: Retrained, done: np.ndarray) -> None:
    """After a barrier: read the other ranks' retrainings from the cache, sum the counts."""
    dist.barrier()
    for r, s in plan.jobs:
        if not done[r, s]:
            values, _ = plan.cached(plan.cache_path(r, s))
            if values is None:
                raise InflError(f"evaluate --lds: another rank's retraining of subset {r} is missing from {plan.cache_dir}")
            out.measured[r, s] = values
    counts = [out.trained_now, out.reused, out.seconds_now, out.seconds_total]
    totals = dist.all_reduce_sum(torch.tensor(counts, dtype=torch.float64))
    out.trained_now, out.reused = int(round(float(totals[0]))), int(round(float(totals[1])))
    out.seconds_now, out.seconds_total = float(totals[2]), float(totals[3])
