"""The per-example quantities behind the mislabel scores, in one self-influence loop.

For training example i with given label y and *alternative* label y' (the most probable
class other than y), let g = ∇ℓ(x, y), g' = ∇ℓ(x, y') over the tracked weights and
P = (H + λI)⁻¹. One forward pass per batch and three backward passes (the graph is kept
between them) give three quadratic forms through the strategy's own fast self-influence
path:

- ``self_influence`` A = gᵀPg;
- ``alternative_self_influence`` B = g'ᵀPg';
- ``relabel_self_influence`` C = (g' − g)ᵀP(g' − g). For softmax cross-entropy the output
  gradient of ℓ(y') − ℓ(y) is e_y − e_y' (the softmax term cancels), so g' − g is the
  gradient of the logit difference z_y − z_y', differentiated directly.

The cross term follows by polarisation: g'ᵀPg = (A + B − C) / 2, so every first-order
score that mixes the two labels (``influence_cli.audit.scores``) is exact in these three
numbers, with no per-example gradient ever stored. Also returned: the losses ℓ(y), ℓ(y')
and y' itself. Cost: one forward and three backward passes plus three self-influence
reductions per batch (≈ 3× ``self_influence``). A Cholesky-factorised solver (``exact``)
whitens instead: z = L⁻¹g and z' = L⁻¹g' give A = ‖z‖², B = ‖z'‖² and C = ‖z' − z‖², so the
third backward pass and the third (P²-per-row) triangular solve are skipped. The block
strategies (``self_terms``) use the same linearity per layer: G(g') − G(g) = G(g' − g), so two
backward passes and two rotated gradients give all three forms.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from influence_cli.engine.batching import ProgressCallback, autocast, iterate_batches
from influence_cli.engine.capture import ActivationCapture
from influence_cli.engine.kernels import Workspace
from influence_cli.engine.scoring import _bind, _finite
from influence_cli.engine.tracked import eval_mode
from influence_cli.errors import InfluenceError

__all__ = ["QUADRATIC_TERMS", "alternative_labels", "mislabel_terms"]

QUADRATIC_TERMS = ("self_influence", "alternative_self_influence", "relabel_self_influence")
_MESSAGE = "mislabel scores produced non-finite values (check the damping and inputs)"


def alternative_labels(logits: Tensor, labels: Tensor) -> Tensor:
    """The most probable class other than the given one (ties: the lower class index)."""
    if logits.shape[1] < 2:
        raise InfluenceError("mislabel scores need at least 2 classes")
    is_label = torch.arange(logits.shape[1], device=logits.device) == labels[:, None]
    return logits.detach().masked_fill(is_label, float("-inf")).argmax(1)


def _objectives(logits: Tensor, labels: Tensor, alternative: Tensor) -> list[Tensor]:
    """The summed objectives whose gradients are g, g' and g' − g (order of QUADRATIC_TERMS)."""
    rows = torch.arange(labels.shape[0], device=logits.device)
    difference = logits[rows, labels] - logits[rows, alternative]  # ℓ(y') − ℓ(y) = z_y − z_y'
    return [
        F.cross_entropy(logits, labels, reduction="sum"),
        F.cross_entropy(logits, alternative, reduction="sum"),
        difference.sum(),
    ]


def mislabel_terms(
    model: torch.nn.Module,
    factors: object,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    on_batch: ProgressCallback | None = None,
    amp: str | None = None,
) -> dict[str, Tensor]:
    """Every example's A, B, C (see the module doc), ``loss`` ℓ(y), ``alternative_loss``
    ℓ(y') and ``alternative`` y', in loader order → {name: (N,)}; and ``probabilities``
    (N, C), the softmax of the same forward pass (float32, what ranking tables show).

    on_batch("self-influence", n) after each batch. Uses the given labels for y.
    """
    dev, bound = _bind(model, factors, device, loader, on_batch)
    capture = ActivationCapture(bound.modules, workspace=Workspace())
    results: dict[str, list[Tensor]] = {
        name: [] for name in (*QUADRATIC_TERMS, "loss", "alternative_loss", "alternative", "probabilities")
    }
    whitening = bool(getattr(bound, "can_whiten", False))
    joint = hasattr(bound, "self_terms")
    terms = 2 if whitening or joint else len(QUADRATIC_TERMS)
    pending: list[list] = [[] for _ in range(terms)]

    def reduce(k: int | None = None) -> None:
        """Score the gathered parts: every term (whitening: from two solves), or term k."""
        if whitening:
            z, z_alt = bound.whiten(pending[0]), bound.whiten(pending[1])
            for name, z_term in zip(QUADRATIC_TERMS, (z, z_alt, z_alt - z)):
                results[name].append(z_term.square().sum(0).cpu().clone())
        for j in (range(terms) if k is None else [k]):
            if not whitening and pending[j]:
                results[QUADRATIC_TERMS[j]].append(bound.self_scores(pending[j]).cpu().clone())
            pending[j].clear()

    rows = 0
    for inputs, labels in iterate_batches(loader, dev):
        captured = []
        with torch.no_grad(), eval_mode(model), capture:
            with autocast(inputs.device, amp):
                logits = capture.forward(model, inputs)
            alternative = alternative_labels(logits, labels)
            with torch.enable_grad(), autocast(inputs.device, amp):
                objectives = _objectives(logits, labels, alternative)[:terms]
                for k, objective in enumerate(objectives):
                    captured.append(capture.gradients(objective, retain_graph=k + 1 < len(objectives)))
            wide = logits.detach().double()
            results["loss"].append(F.cross_entropy(wide, labels, reduction="none").cpu())
            results["alternative_loss"].append(F.cross_entropy(wide, alternative, reduction="none").cpu())
            results["alternative"].append(alternative.cpu())
            results["probabilities"].append(torch.softmax(logits.detach().float(), dim=1).cpu())
            del logits, objectives
        n = int(labels.shape[0])
        rows += n
        flush = rows >= bound.chunk_rows
        if joint:
            for name, value in zip(QUADRATIC_TERMS, bound.self_terms(captured[0], captured[1])):
                results[name].append(value.cpu().clone())
        else:
            for k, layers in enumerate(captured):
                pending[k].append(bound.self_part(layers))
                if flush and not whitening:  # before the next term's part: reused buffers in order
                    reduce(k)
            if flush and whitening:  # flat parts are fresh tensors, kept until the chunk is solved
                reduce()
        rows = 0 if flush else rows
        if on_batch is not None:
            on_batch("self-influence", n)
    if pending[0]:
        reduce()
    if not results["loss"]:
        raise InfluenceError("the data loader yielded no examples")
    out = {name: torch.cat(values) for name, values in results.items()}
    for name in QUADRATIC_TERMS:
        _finite(out[name], _MESSAGE)
    return out
