"""Correcting a trained model for a set of training examples, and retraining for reference.

Shared by `infl fix` (app/fix.py) and `infl evaluate --fix` (evaluation/fixing.py): the
influence step of ``engine.correction`` with the training objective as its guard, an
optional short fine-tune, and the from-scratch retraining it is measured against.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from influence_cli.config import Config
from influence_cli.loaders import BatchLoader
from influence_cli.training import (
    accuracy, make_optimizer, predict_probs, resolve_device, threads_for, torch_threads, train_model,
)


@dataclass
class CorrectedModel:
    model: nn.Module
    result: Any  # engine.correction.CorrectionResult
    untracked: list[str]
    seconds: float
    finetune_steps: int = 0


def corrected_train_set(train: Any, rows: torch.Tensor, action: str, new_labels: Optional[torch.Tensor]) -> Any:
    """The training set after the fix: S dropped (remove) or S relabelled (relabel)."""
    if action == "remove":
        keep = torch.ones(len(train), dtype=torch.bool)
        keep[rows] = False
        return train.subset(torch.nonzero(keep).squeeze(1))
    labels = train.labels.clone()
    labels[rows] = new_labels
    return dataclasses.replace(train, labels=labels)


def training_objective(model: nn.Module, dataset: Any, weight_decay: float, batch_size: int = 1024) -> float:
    """Mean cross-entropy on ``dataset`` + weight_decay/2 ‖θ‖²: what training minimised
    (the L2 term of torch's ``weight_decay``), the guard of the correction step."""
    from influence_cli.engine.correction import mean_loss

    loss = mean_loss(model, dataset.inputs, dataset.labels, batch_size=batch_size)
    if weight_decay:
        loss += 0.5 * float(weight_decay) * float(sum(p.detach().double().square().sum() for p in model.parameters()))
    return loss


def correct(
    model: nn.Module, factors: Any, train: Any, rows: torch.Tensor, *, action: str, new_labels: Optional[torch.Tensor],
    config: Config, loader: Any = None, device: Any = None, finetune_steps: int = 0, seed: int = 0,
) -> CorrectedModel:
    """A corrected copy of ``model`` (the original is untouched)."""
    from influence_cli.engine.correction import correct_model, correction_direction, untracked_parameters

    start = time.perf_counter()
    fixed = copy.deepcopy(model)
    target = corrected_train_set(train, rows, action, new_labels)
    wd = float(config.train.weight_decay)
    batch = int(config.influence.batch_size)
    # Tiny CPU workloads run faster on one thread (training.threads_for), the guard's
    # forward passes over the training set included.
    with torch_threads(threads_for(fixed, batch, torch.device(device or "cpu"))):
        step = correction_direction(
            fixed, factors, train.inputs[rows], train.labels[rows], action=action, num_examples=len(train),
            new_labels=new_labels, device=device, loader=loader, batch_size=batch,
        )
        result = correct_model(fixed, factors.check_model(fixed), step, lambda m: training_objective(m, target, wd))
    fixed.cpu()
    if finetune_steps:
        finetune(fixed, target, config, finetune_steps, seed)
    untracked = untracked_parameters(fixed, factors.check_model(fixed))
    return CorrectedModel(fixed.eval(), result, untracked, time.perf_counter() - start, finetune_steps)


def finetune(model: nn.Module, dataset: Any, config: Config, steps: int, seed: int) -> None:
    """``steps`` optimizer steps of the training recipe on the corrected data (a hybrid)."""
    device = resolve_device(config.train.device)
    torch.manual_seed(seed)
    model.to(device).train()
    optimizer = make_optimizer(model, config.train)
    loader = BatchLoader(dataset, config.train.batch_size, shuffle=True, seed=seed + 1)
    done = 0
    with torch_threads(threads_for(model, config.train.batch_size, device)):
        while done < steps:
            for x, y, _idx in loader:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                done += 1
                if done >= steps:
                    break
    model.cpu().eval()


def retrain(data: Any, train: Any, config: Config, *, seed: int, reporter: Any = None) -> tuple[nn.Module, float]:
    """A model trained from scratch on ``train`` with the run's recipe and seed → (model, seconds)."""
    from influence_cli.models import build_model

    model = build_model(config.model, tuple(data.input_shape), len(data.class_names), seed=seed)
    start = time.perf_counter()
    train_model(model, train, config.train, seed=seed, device=resolve_device(config.train.device), reporter=reporter)
    return model.cpu().eval(), time.perf_counter() - start


def split_metrics(model: nn.Module, dataset: Any) -> dict[str, float]:
    """Accuracy and mean loss of ``model`` on a split, with the split's own labels."""
    probs = predict_probs(model, dataset)
    loss = F.nll_loss(torch.log(probs.clamp_min(1e-30)), dataset.labels).item() if len(dataset) else float("nan")
    return {"accuracy": accuracy(probs, dataset.labels), "loss": float(loss)}


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def comparison(corrected: nn.Module, original: nn.Module, retrained: nn.Module, test: Any) -> dict[str, float]:
    """How close the correction comes to retraining: test agreement, parameter distance."""
    pc = predict_probs(corrected, test).argmax(1)
    pr = predict_probs(retrained, test).argmax(1)
    po = predict_probs(original, test).argmax(1)
    t_r = flat_parameters(retrained)
    return {
        "agreement": float((pc == pr).float().mean()),
        "original_agreement": float((po == pr).float().mean()),
        "relative_distance": float((flat_parameters(corrected) - t_r).norm() / (flat_parameters(original) - t_r).norm()),
    }
