"""Capturing tracked layers' per-example inputs and output-gradients.

Influence needs, for every tracked layer and every example i, the gradient of that
example's loss w.r.t. the layer's weight, G_i = sum_p g_ip a_ip^T (d_out x d_in, bias
folded in as the last input column). We never ask autograd for weight gradients: a
forward hook records the layer's input ``a`` and its output tensor, and one
``torch.autograd.grad(loss, outputs)`` gives ``g``. That skips the weight-gradient GEMMs
and lets the callers exploit the rank structure of G_i (rank one for plain Linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from influence_cli.engine.batches import batch_size, call_model, logits_of, position_mask
from influence_cli.engine.kernels import Workspace, scratch
from influence_cli.engine.tracked import column_order
from influence_cli.errors import InfluenceError

__all__ = ["LayerBatch", "ActivationCapture", "conv_patches", "logits_of"]


@dataclass
class LayerBatch:
    """One tracked layer's data for a batch of n examples.

    a: (n, P, d_in) inputs, bias ones column last when the layer has a bias.
    g: (n, P, d_out) gradients of the summed loss w.r.t. the layer's outputs.
    perm: columns of ``a`` may be in an internal order (conv patches): internal column j
        is weight column perm[j] (None = weight order). See ``to_weight_order``.
    count: positions that are real tokens (padding rows of a and g are zero and do not
        count towards A = E[a aᵀ]); None = every one of the n·P positions.
    The per-example weight gradient is G_i = g_i^T a_i (in the columns' order).
    """

    a: Tensor
    g: Tensor
    perm: Tensor | None = None
    count: int | None = None

    @property
    def real_positions(self) -> int:
        """Positions that enter the covariance A (all n·P unless padding was masked)."""
        return self.a.shape[0] * self.a.shape[1] if self.count is None else self.count

    @property
    def n(self) -> int:
        return self.a.shape[0]

    @property
    def positions(self) -> int:
        return self.a.shape[1]


@dataclass
class _Call:
    inputs: Tensor
    input_version: int
    output: Tensor
    output_version: int
    order: int


class ActivationCapture:
    """Forward hooks that record tracked layers' inputs and outputs for one forward pass.

    Usage::

        with ActivationCapture(modules) as cap:
            logits = cap.forward(model, x)
            loss = F.cross_entropy(logits, y, reduction="sum")
            layers = cap.gradients(loss)   # {name: LayerBatch}

    If a later operation modifies a recorded tensor in place (``ReLU(inplace=True)``,
    ``x += residual``), the forward pass is re-run once with protective copies, so the
    recorded values are always the layer's own input and output.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        dtype: torch.dtype | None = None,
        workspace: Workspace | None = None,
    ):
        """workspace: reuse buffers for the captured ``a`` across batches (the returned
        LayerBatch tensors are then only valid until the next forward)."""
        self.modules = dict(modules)
        self.dtype = dtype
        self.workspace = workspace
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls: dict[str, list[_Call]] = {}
        self._protect = False
        self._batch_size = 0
        self._order = 0
        self._perms: dict[str, Tensor | None] = {}
        self._mask: Tensor | None = None

    def __enter__(self) -> "ActivationCapture":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._calls = {}

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> Tensor | None:
            if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
                raise InfluenceError(
                    f"tracked module {name!r} must take and return a single tensor"
                )
            x = args[0].detach()
            if self._protect:
                x = x.clone()
            replacement: Tensor | None = None
            out = output
            if not out.requires_grad:
                # Frozen upstream: make the output a leaf so we can differentiate to it.
                out = out.detach().requires_grad_()
                replacement = out.clone()
            elif self._protect:
                replacement = out.clone()
            self._order += 1
            self._calls[name].append(_Call(x, x._version, out, out._version, self._order))
            return replacement

        return hook

    def forward(self, model: nn.Module, inputs: object) -> Tensor:
        """Run the model once with grad enabled and record every tracked layer.

        ``inputs``: a tensor, a dict of keyword arguments or a tuple (engine/batches.py);
        its padding mask, if any, zeroes the padded positions of sequence layers.
        """
        self._batch_size = batch_size(inputs)
        self._mask = position_mask(model, inputs)
        for _attempt in range(2):
            self._calls = {name: [] for name in self.modules}
            with torch.enable_grad():
                output = call_model(model, inputs)
            missing = [name for name, calls in self._calls.items() if not calls]
            if missing:
                self._calls = {}
                names = ", ".join(repr(m) for m in missing)
                raise InfluenceError(
                    f"tracked module(s) {names} never ran their forward() during the "
                    "forward pass (e.g. nn.MultiheadAttention's out_proj bypasses it); "
                    "exclude them with `influence.modules` patterns that list only the "
                    "layers to track"
                )
            if self._modified_in_place():
                if self._protect:
                    raise InfluenceError("a tracked layer's input changed during the forward pass")
                self._protect = True
                continue
            logits = logits_of(output)
            if not bool(torch.isfinite(logits.detach()).all()):
                culprit = self._first_non_finite()
                self._calls = {}
                raise InfluenceError(
                    "the model produced non-finite outputs"
                    + (f"; first non-finite values at tracked layer {culprit}" if culprit else "")
                    + " (check the inputs, the checkpoint, and the layer's scale)"
                )
            return logits
        raise AssertionError("unreachable")

    def _first_non_finite(self) -> str | None:
        """The first tracked layer (in call order) whose input or output is not finite."""
        records = [
            (call.order, name, call) for name, calls in self._calls.items() for call in calls
        ]
        for _order, name, call in sorted(records, key=lambda r: r[0]):
            if not bool(torch.isfinite(call.inputs).all()):
                return f"{name!r} (its input)"
            if not bool(torch.isfinite(call.output.detach()).all()):
                return f"{name!r} (its output)"
        return None

    def _modified_in_place(self) -> bool:
        for calls in self._calls.values():
            for call in calls:
                if call.inputs._version != call.input_version:
                    return True
                if call.output._version != call.output_version:
                    return True
        return False

    def gradients(self, loss: Tensor) -> dict[str, LayerBatch]:
        """Differentiate ``loss`` w.r.t. the recorded outputs only; build (a, g) per layer.

        Frees the recorded graph. Weight gradients are never computed.
        """
        names: list[str] = []
        outputs: list[Tensor] = []
        for name, calls in self._calls.items():
            for call in calls:
                names.append(name)
                outputs.append(call.output)
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        calls_by_name = self._calls
        self._calls = {}
        result: dict[str, LayerBatch] = {}
        index = 0
        with torch.no_grad():
            for name, calls in calls_by_name.items():
                pieces_a: list[Tensor] = []
                pieces_g: list[Tensor] = []
                counts: list[int | None] = []
                for number, call in enumerate(calls):
                    grad = grads[index]
                    if grad is None:
                        grad = torch.zeros_like(call.output)
                    index += 1
                    tag = f"{name}#{number}" if len(calls) > 1 else name
                    a, g, count = self._layer_data(name, self.modules[name], call.inputs, grad, tag)
                    pieces_a.append(a)
                    pieces_g.append(g)
                    counts.append(count)
                perm = self._perms.get(name)
                if name not in self._perms:
                    perm = self._perms[name] = column_order(self.modules[name])
                if len(pieces_a) == 1:
                    result[name] = LayerBatch(pieces_a[0], pieces_g[0], perm, counts[0])
                else:
                    if len({p.shape[0] for p in pieces_a}) != 1:
                        raise InfluenceError(
                            f"tracked module {name!r} was called on tensors with different "
                            "batch sizes in one forward pass"
                        )
                    total = None
                    if any(c is not None for c in counts):
                        total = sum(p.shape[0] * p.shape[1] if c is None else c for p, c in zip(pieces_a, counts))
                    result[name] = LayerBatch(torch.cat(pieces_a, 1), torch.cat(pieces_g, 1), perm, total)
        return result

    def _cast(self, t: Tensor) -> Tensor:
        dtype = self.dtype or torch.promote_types(t.dtype, torch.float32)
        return t if t.dtype == dtype else t.to(dtype)

    def _layer_data(
        self, name: str, module: nn.Module, x: Tensor, grad: Tensor, tag: str
    ) -> tuple[Tensor, Tensor, int | None]:
        n = x.shape[0]
        if n != self._batch_size:
            raise InfluenceError(
                f"tracked module {name!r} received a tensor whose first dimension ({n}) is "
                f"not the batch size ({self._batch_size}); only batch-first layers are supported"
            )
        has_bias = getattr(module, "bias", None) is not None
        x = self._cast(x)
        grad = self._cast(grad)
        if isinstance(module, nn.Conv2d):
            if x.dim() != 4:
                raise InfluenceError(f"tracked Conv2d {name!r} needs (N, C, H, W) input")
            a = conv_patches(module, x, has_bias, self.workspace, tag)  # internal column order
            d_out = grad.shape[1]
            g = grad.reshape(n, d_out, -1).transpose(1, 2)  # (n, L, d_out) view
            if g.shape[1] != a.shape[1]:
                raise InfluenceError(f"unfolded patches of {name!r} do not match its output")
            return a, g, None
        if x.dim() < 2:
            raise InfluenceError(f"tracked Linear {name!r} needs batched input (N, ..., d)")
        d_raw = x.shape[-1]
        a = x.reshape(n, -1, d_raw)
        if has_bias:
            out = scratch(self.workspace, f"{tag}/a", (n, a.shape[1], d_raw + 1), a)
            out[:, :, :d_raw].copy_(a)
            out[:, :, d_raw].fill_(1.0)
            a = out
        g = grad.reshape(n, -1, grad.shape[-1])
        return self._masked(a, g)

    def _masked(self, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor, int | None]:
        """Zero the padded positions of a sequence layer's (a, g) (the forward's mask,
        when the layer has one row per token): they add nothing to G_i = Σ_t g_t a_tᵀ, to
        A or to S, and A is normalised by the real positions only."""
        mask = self._mask
        if mask is None or a.shape[1] == 1 or mask.shape != a.shape[:2]:
            return a, g, None
        keep = mask.to(device=a.device, dtype=a.dtype).unsqueeze(-1)
        return a * keep, g * keep.to(g.dtype), int(mask.count_nonzero())


def conv_patches(
    module: nn.Conv2d,
    x: Tensor,
    has_bias: bool,
    workspace: Workspace | None = None,
    tag: str = "conv",
) -> Tensor:
    """Input patches (N, L, d_in) of a conv in the *internal* column order (kh, kw, C).

    Gathering from a channels-last padded copy makes every (kw, C) run contiguous, which
    is several times faster than F.unfold plus a transpose. ``column_order`` maps these
    columns to the weight's (C, kh, kw) order; bias (ones) is the last column.
    """
    n, channels, height, width = x.shape
    kh, kw = module.kernel_size
    sh, sw = module.stride
    dh, dw = module.dilation
    if isinstance(module.padding, str):
        if module.padding == "same":
            left, right, top, bottom = module._reversed_padding_repeated_twice
        else:  # "valid"
            left = right = top = bottom = 0
    else:
        top = bottom = module.padding[0]
        left = right = module.padding[1]
    hp, wp = height + top + bottom, width + left + right
    padded = scratch(workspace, f"{tag}/padded", (n, hp, wp, channels), x)
    if top or bottom or left or right:
        padded.zero_()
    padded[:, top : top + height, left : left + width, :] = x.permute(0, 2, 3, 1)
    ho = (hp - dh * (kh - 1) - 1) // sh + 1
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    d_raw = channels * kh * kw
    view = padded.as_strided(
        (n, ho, wo, kh, kw, channels),
        (hp * wp * channels, sh * wp * channels, sw * channels, dh * wp * channels, dw * channels, 1),
    )
    a = scratch(workspace, f"{tag}/a", (n, ho * wo, d_raw + (1 if has_bias else 0)), x)
    a[:, :, :d_raw].view(n, ho, wo, kh, kw, channels).copy_(view)
    if has_bias:
        a[:, :, d_raw].fill_(1.0)
    return a
