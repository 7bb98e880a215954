"""Dense per-example references for Linear layers on padded sequences (tests only).

Each example runs alone, cut to its real length (no padding at all), so nothing here
depends on the engine's masks: a_t and g_t come from a forward hook and retain_grad, the
per-example weight gradient G_i from autograd's own weight gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from influence_cli.engine.batches import logits_of


def unpadded_examples(input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, extra=None):
    """[(kwargs of one example cut to its length, label)], kwargs as the model takes them."""
    out = []
    for i in range(len(labels)):
        length = int(mask[i].sum())
        kwargs = {"input_ids": input_ids[i : i + 1, :length], "attention_mask": mask[i : i + 1, :length]}
        for key, value in (extra or {}).items():
            kwargs[key] = value[i : i + 1, :length]
        out.append((kwargs, int(labels[i])))
    return out


def reference_factors(model: nn.Module, examples, names: list[str]):
    """{layer: (A, S, G)}: A = Σ_{i,t} a aᵀ / #tokens, S = Σ_i Σ_t g gᵀ / N (bias folded in
    as the last input column) and G (N, d_out, d_in) the autograd per-example gradients."""
    modules = dict(model.named_modules())
    sums = {n: [0.0, 0.0, 0, []] for n in names}
    for kwargs, label in examples:
        records = {}

        def hook(name, records=records):
            def fn(module, args, out):
                out.retain_grad()
                records[name] = (args[0].detach(), out)

            return fn

        handles = [modules[n].register_forward_hook(hook(n)) for n in names]
        model.zero_grad()
        logits = logits_of(model(**kwargs))
        F.cross_entropy(logits, torch.tensor([label]), reduction="sum").backward()
        for h in handles:
            h.remove()
        for n in names:
            module = modules[n]
            x, output = records[n]
            a = x.reshape(-1, x.shape[-1])
            g = output.grad.reshape(-1, output.shape[-1])
            grad = module.weight.grad
            if module.bias is not None:
                a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
                grad = torch.cat([grad, module.bias.grad[:, None]], 1)
            entry = sums[n]
            entry[0] = entry[0] + a.T @ a
            entry[1] = entry[1] + g.T @ g
            entry[2] += len(a)
            entry[3].append(grad.clone())
    count = len(examples)
    return {n: (e[0] / e[2], e[1] / count, torch.stack(e[3])) for n, e in sums.items()}


def rotated(layer, grads: torch.Tensor) -> torch.Tensor:
    """Q_Sᵀ G_i Q_A for every row of ``grads`` (identity where a basis is None)."""
    out = grads
    if layer.q_s is not None:
        out = layer.q_s.T.to(out.dtype) @ out
    if layer.q_a is not None:
        out = out @ layer.q_a.to(out.dtype)
    return out


def reference_scores(factors, grads_by_layer, test_by_layer=None):
    """Self-influence (N,) or pairwise (T, N) from explicit per-example gradients."""
    total = 0.0
    for name, grads in grads_by_layer.items():
        layer = factors.layers[name]
        weight = 1.0 / (layer.eigenvalues.to(grads.dtype) + layer.damping)
        train = rotated(layer, grads).reshape(len(grads), -1)
        if test_by_layer is None:
            total = total + (train.square() * weight.reshape(1, -1)).sum(1)
        else:
            test = rotated(layer, test_by_layer[name]).reshape(len(test_by_layer[name]), -1)
            total = total + (test * weight.reshape(1, -1)) @ train.T
    return total


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
