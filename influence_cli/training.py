"""Deterministic training and prediction.

Training is seeded end to end (initial weights, shuffling), so the same config gives the
same checkpoint and every later cached stage stays valid.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import torch
from torch import nn

from influence_cli.config import TrainConfig
from influence_cli.errors import InflError
from influence_cli.loaders import BatchLoader
from influence_cli.progress import Reporter


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an unavailable CUDA device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InflError(f"device '{name}' requested but CUDA is not available here (use device: auto or cpu)")
    return torch.device(name)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None leaves it alone)."""
    if count is None or count == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_for(model: nn.Module, batch_size: int, device: torch.device) -> int | None:
    """One thread for tiny CPU workloads: per-op thread start-up costs more than it saves
    there, and far more when another process holds the other cores."""
    if device.type != "cpu":
        return None
    work = batch_size * sum(p.numel() for p in model.parameters())
    return 1 if work < 20_000_000 else None


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_model(
    model: nn.Module,
    train_set: Any,
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    reporter: Reporter | None = None,
) -> dict[str, float]:
    """Train in place with mean cross-entropy (mean ½ squared error for float labels,
    task: regression); returns the final epoch's mean loss and time."""
    reporter = reporter or Reporter()
    torch.manual_seed(seed)
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    loader = BatchLoader(train_set, cfg.batch_size, shuffle=True, seed=seed)
    if train_set.labels.is_floating_point():
        from influence_cli.engine.losses import task_loss

        def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return task_loss(out, y) / len(y)
    else:
        loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    last_loss = float("nan")
    with torch_threads(threads_for(model, cfg.batch_size, device)), reporter.task(f"training {cfg.epochs} epochs", cfg.epochs * len(loader)) as advance:
        for _ in range(cfg.epochs):
            total, count = 0.0, 0
            for x, y, _idx in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(y)
                count += len(y)
                advance(1)
            last_loss = total / max(count, 1)
            if last_loss != last_loss:
                raise InflError("training diverged (loss is NaN): lower train.lr")
    model.eval()
    return {"final_train_loss": last_loss, "train_seconds": time.perf_counter() - start}


@torch.no_grad()
def predict_probs(model: nn.Module, dataset: Any, *, batch_size: int = 512, device: torch.device | None = None) -> torch.Tensor:
    """Softmax probabilities for every example, in dataset order, on the CPU; for a
    regression set (float labels) the model's raw outputs, (N, outputs)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    regression = dataset.labels.is_floating_point()
    for x, _y, _idx in BatchLoader(dataset, batch_size):
        outputs = model(x.to(device)).float()
        out.append((outputs.reshape(len(x), -1) if regression else torch.softmax(outputs, dim=1)).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of argmax classes equal to the labels; for regression (float labels) the
    coefficient of determination R² of the first output."""
    if len(labels) == 0:
        return float("nan")
    if labels.is_floating_point():
        y, f = labels.double().reshape(-1), probs.double()[:, 0]
        total = float(((y - y.mean()) ** 2).sum())
        return 1.0 - float(((y - f) ** 2).sum()) / total if total > 0 else float("nan")
    return float((probs.argmax(1) == labels).float().mean())
