"""Fitting curvature factors (EK-FAC and friends) and storing them.

Every strategy yields, per tracked layer, an eigenbasis (Q_S, Q_A; None = identity) and
eigenvalues Λ (d_out × d_in), so one preconditioner formula serves all of them:

    P(G) = Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ.

Fitting is two passes over the data: pass 1 accumulates A = E[a aᵀ] and S = E[g gᵀ] and
eigendecomposes them; pass 2 (EK-FAC only) re-fits the eigenvalues in that basis from
the per-example gradients, Λ_jk = E_i[(Q_Sᵀ G_i Q_A)_jk²]. Pass 2 never builds G_i for
rank-one layers and rotates each side of a conv gradient where it is cheaper.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from influence_cli.errors import CorruptFactorsError, FactorsError, InfluenceError, output_error
from influence_cli.influence.modules import (
    ActivationCapture,
    LayerBatch,
    Workspace,
    eval_mode,
    layer_kind,
    layer_shape,
    select_modules,
    to_internal_order,
    to_weight_order,
)
from influence_cli.influence.precondition import (
    chunk_size,
    matmul_t,
    reference_rotated_grads,
    rotated_per_example_grads,
)

__all__ = [
    "LayerFactors",
    "Factors",
    "Strategy",
    "FitContext",
    "STRATEGIES",
    "register_strategy",
    "available_strategies",
    "fit_factors",
    "dense_preconditioner",
    "resolve_device",
    "CovarianceSums",
    "covariance_sums",
    "eigenvalue_sums",
    "bases_from_covariances",
    "factors_from_sums",
    "sample_fisher_labels",
    "autocast",
    "SHARDABLE",
    "FACTORS_FILE",
    "META_FILE",
    "SOLVER_STRATEGIES",
    "DEFAULT_DAMPING_FACTORS",
    "default_damping_factor",
    "atomic_save",
    "check_tracked",
    "merge_extra_meta",
    "file_sha256",
    "TENSORS_HASH",
    "META_HASH",
    "meta_digest",
]

FACTORS_FILE = "factors.safetensors"
META_FILE = "meta.json"
FORMAT_VERSION = 1
AUTO_DAMPING_SCALE = 0.1
# damping "auto" = factor × mean eigenvalue. Measured on digits-mlp (LDS against 100
# retrainings, docs/damping.md): the block approximations peak near 0.1, the dense
# Gauss-Newton (exact, and LiSSA which solves the same system) near 3 — the true GN has
# many near-zero eigenvalues that K-FAC's factorisation does not reproduce.
DEFAULT_DAMPING_FACTORS = {"ekfac": AUTO_DAMPING_SCALE, "kfac": AUTO_DAMPING_SCALE, "diagonal": AUTO_DAMPING_SCALE,
                           "identity": AUTO_DAMPING_SCALE, "exact": 3.0, "lissa": 3.0}


def default_damping_factor(strategy: str) -> float:
    """The measured default factor of ``damping: auto`` for a strategy."""
    return DEFAULT_DAMPING_FACTORS.get(strategy, AUTO_DAMPING_SCALE)
DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
ProgressCallback = Callable[[str, int], None]
BatchData = tuple[int, dict[str, LayerBatch]]  # (batch size, captured (a, g) per layer)


@dataclass
class LayerFactors:
    """One layer's preconditioner: eigenbases (None = identity), eigenvalues, damping."""

    name: str
    kind: str  # "linear" | "conv2d"
    d_out: int
    d_in: int  # includes the folded bias column
    has_bias: bool
    q_s: Tensor | None  # (d_out, d_out)
    q_a: Tensor | None  # (d_in, d_in)
    eigenvalues: Tensor  # (d_out, d_in)
    damping: float


@dataclass
class Factors:
    """Fitted factors of every tracked layer, plus how they were fitted."""

    strategy: str
    damping_rule: str | float
    fisher: str
    num_examples: int
    layers: dict[str, LayerFactors]
    meta: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- storage
    def save(self, directory: str | os.PathLike, extra_meta: dict[str, Any] | None = None) -> Path:
        """Write ``factors.safetensors`` then ``meta.json`` atomically into ``directory``.

        Files go to a temporary sibling directory that is renamed into place, so an
        interrupted run never leaves a directory that a later run would trust.
        """
        target = Path(directory)
        meta = merge_extra_meta(self._meta_dict(), extra_meta)
        tensors: dict[str, Tensor] = {}
        for name, layer in self.layers.items():
            tensors[_key(name, "eigenvalues")] = layer.eigenvalues.detach().cpu().contiguous()
            if layer.q_s is not None:
                tensors[_key(name, "q_s")] = layer.q_s.detach().cpu().contiguous()
            if layer.q_a is not None:
                tensors[_key(name, "q_a")] = layer.q_a.detach().cpu().contiguous()
        atomic_save(target, tensors, meta)
        self.meta = meta
        return target

    def _meta_dict(self) -> dict[str, Any]:
        try:
            from influence_cli import __version__ as version
        except ImportError:  # pragma: no cover
            version = "0"
        dtypes = {str(layer.eigenvalues.dtype).replace("torch.", "") for layer in self.layers.values()}
        return {
            "format_version": FORMAT_VERSION,
            "strategy": self.strategy,
            "damping_rule": self.damping_rule,
            "fisher": self.fisher,
            "num_examples": int(self.num_examples),
            "package_version": str(version),
            "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
            "modules": {
                name: {
                    "kind": layer.kind,
                    "d_out": layer.d_out,
                    "d_in": layer.d_in,
                    "has_bias": layer.has_bias,
                    "damping": float(layer.damping),
                    "q_s": layer.q_s is not None,
                    "q_a": layer.q_a is not None,
                }
                for name, layer in self.layers.items()
            },
        }

    @staticmethod
    def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
        """The parsed ``meta.json`` of a factors directory (FactorsError if absent/corrupt)."""
        path = Path(directory) / META_FILE
        if not path.is_file():
            raise FactorsError(f"no fitted factors at {Path(directory)} ({META_FILE} missing); run fit-factors")
        try:
            meta = json.loads(path.read_text())
        except OSError as exc:
            raise FactorsError(f"cannot read factors metadata {path}: {exc.strerror or exc}; re-run fit-factors") from None
        except ValueError as exc:
            raise CorruptFactorsError(
                f"corrupt factors metadata {path}: {exc}; re-run fit-factors", f"{META_FILE} is truncated or not valid JSON"
            ) from None
        if not isinstance(meta, dict):
            raise FactorsError(f"corrupt factors metadata {path}: not a JSON object; re-run fit-factors")
        if meta.get(META_HASH) != meta_digest(meta):
            if META_HASH in meta:
                why = "damaged or edited (its content hash does not match)"
            else:
                why = "without a content hash (written by an older infl)"
            raise CorruptFactorsError(
                f"corrupt factors metadata {path}: {why}; re-run fit-factors", f"{META_FILE} is {why}"
            )
        return meta

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Factors":
        """Load factors saved by :meth:`save`; FactorsError with one line if unusable."""
        directory = Path(directory)
        meta, tensors = read_stored(directory)
        try:
            layers: dict[str, LayerFactors] = {}
            for name, info in meta["modules"].items():
                d_out, d_in = int(info["d_out"]), int(info["d_in"])
                eig = tensors[_key(name, "eigenvalues")]
                q_s = tensors[_key(name, "q_s")] if info["q_s"] else None
                q_a = tensors[_key(name, "q_a")] if info["q_a"] else None
                if tuple(eig.shape) != (d_out, d_in):
                    raise ValueError(f"eigenvalues of {name!r} have shape {tuple(eig.shape)}")
                if q_s is not None and tuple(q_s.shape) != (d_out, d_out):
                    raise ValueError(f"q_s of {name!r} has shape {tuple(q_s.shape)}")
                if q_a is not None and tuple(q_a.shape) != (d_in, d_in):
                    raise ValueError(f"q_a of {name!r} has shape {tuple(q_a.shape)}")
                layers[name] = LayerFactors(
                    name=name,
                    kind=str(info["kind"]),
                    d_out=d_out,
                    d_in=d_in,
                    has_bias=bool(info["has_bias"]),
                    q_s=q_s,
                    q_a=q_a,
                    eigenvalues=eig,
                    damping=float(info["damping"]),
                )
            factors = cls(
                strategy=str(meta["strategy"]),
                damping_rule=meta["damping_rule"],
                fisher=str(meta["fisher"]),
                num_examples=int(meta["num_examples"]),
                layers=layers,
                meta=meta,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FactorsError(
                f"factors at {directory} are incomplete or inconsistent ({exc}); re-run fit-factors"
            ) from None
        if not layers:
            raise FactorsError(f"factors at {directory} track no module; re-run fit-factors")
        return factors

    def check_model(self, model: nn.Module) -> dict[str, nn.Module]:
        """The model's modules matching the stored layers; FactorsError on any mismatch."""
        return check_tracked(
            model,
            {name: (layer.kind, layer.d_out, layer.d_in, layer.has_bias) for name, layer in self.layers.items()},
        )


def read_stored(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(meta.json, tensors) of a stored strategy directory; FactorsError with one line
    when either is missing or corrupt."""
    from safetensors.torch import load_file

    meta = Factors.read_meta(directory)
    path = directory / FACTORS_FILE
    if not path.is_file():
        raise FactorsError(f"no fitted factors at {directory} ({FACTORS_FILE} missing); run fit-factors")
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise FactorsError(f"cannot read factors file {path}: {exc.strerror or exc}") from None
    if digest != meta.get(TENSORS_HASH):
        raise CorruptFactorsError(
            f"corrupt factors file {path}: truncated or damaged (its sha256 does not match {META_FILE}); re-run fit-factors",
            f"{FACTORS_FILE} is truncated or damaged (its sha256 does not match {META_FILE})",
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise FactorsError(f"corrupt factors file {path}: {exc}; re-run fit-factors") from None
    return meta, tensors


def merge_extra_meta(meta: dict[str, Any], extra_meta: dict[str, Any] | None) -> dict[str, Any]:
    """meta with the caller's keys added; a clash with a reserved key is refused."""
    for key, value in (extra_meta or {}).items():
        if key in meta:
            raise ValueError(f"extra_meta key {key!r} clashes with a reserved meta key")
        meta[key] = value
    return meta


def atomic_save(target: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write ``FACTORS_FILE`` then ``META_FILE`` into ``target`` atomically.

    Files go to a temporary sibling directory that is renamed into place, so an
    interrupted run never leaves a directory that a later run would trust. Shared by
    every strategy (Factors and the dense/iterative solvers) so callers treat all alike.
    """
    from safetensors.torch import save_file

    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise output_error(target, exc) from None
    try:
        save_file(tensors, str(tmp / FACTORS_FILE), metadata={"format": "infl-factors"})
        os.chmod(tmp / FACTORS_FILE, 0o666 & ~_umask())  # the temp file safetensors renames is 0600
        # meta.json last (its presence marks a complete write), carrying the sha256 of the
        # tensors and of itself: a truncated or damaged file is refused on load.
        meta[TENSORS_HASH] = file_sha256(tmp / FACTORS_FILE)
        meta[META_HASH] = meta_digest(meta)
        _write_json(tmp / META_FILE, meta)
        _fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = output_error(target, exc) if isinstance(exc, Exception) else None
        if error is None:
            raise
        raise error from None


TENSORS_HASH = "tensors_sha256"
META_HASH = "meta_sha256"


def file_sha256(path: Path) -> str:
    """Full SHA-256 hex digest of a file (streamed; the pages stay cached for the load)."""
    import hashlib

    with open(path, "rb") as handle:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11
            return hashlib.file_digest(handle, "sha256").hexdigest()
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        return digest.hexdigest()


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of meta.json's content without its own hash (canonical JSON)."""
    import hashlib

    plain = {k: v for k, v in meta.items() if k != META_HASH}
    return hashlib.sha256(json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_tracked(
    model: nn.Module, layers: dict[str, tuple[str, int, int, bool]]
) -> dict[str, nn.Module]:
    """The model's modules matching stored {name: (kind, d_out, d_in, has_bias)};
    FactorsError on any mismatch (stale or foreign factors)."""
    named = dict(model.named_modules())
    modules: dict[str, nn.Module] = {}
    for name, (stored_kind, d_out, d_in, has_bias) in layers.items():
        module = named.get(name)
        if module is None:
            raise FactorsError(
                f"factors track module {name!r} that the model does not have; re-run fit-factors"
            )
        try:
            kind = layer_kind(module)
        except InfluenceError:
            kind = type(module).__name__
        shape = layer_shape(module) if hasattr(module, "weight") else None
        if kind != stored_kind or shape != (d_out, d_in, has_bias):
            raise FactorsError(
                f"factors for module {name!r} ({stored_kind}, {d_out}x{d_in}) do "
                f"not match the model's ({kind}, {shape}); re-run fit-factors"
            )
        modules[name] = module
    return modules


def _key(name: str, what: str) -> str:
    return f"{name}::{what}"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# ====================================================================== fitting
@dataclass
class FitContext:
    """Everything a strategy's fit function needs."""

    model: nn.Module
    loader: Iterable
    modules: dict[str, nn.Module]
    device: torch.device
    fisher: str
    seed: int
    on_batch: ProgressCallback | None
    reference: bool = False
    cache_bytes: int = 0
    dist: Any = None  # DistContext-like (world_size, rank, all_reduce_sum, broadcast) or None
    amp: str | None = None  # "bfloat16" | "float16": autocast the forward/backward only


@dataclass(frozen=True)
class Strategy:
    """A named way of fitting per-layer (Q_S, Q_A, Λ).

    ``fit`` returns (layers with damping left unset, number of examples seen).
    ``fixed_damping`` overrides the damping rule (identity uses 1 so P = I).
    """

    name: str
    description: str
    fit: Callable[[FitContext], tuple[dict[str, LayerFactors], int]]
    fixed_damping: float | None = None


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    """Make a strategy available by name (fit_factors, CLI choices and --help)."""
    STRATEGIES[strategy.name] = strategy
    return strategy


# Strategies with their own preconditioner objects (influence.solvers), not per-layer
# eigenbases; fit_factors dispatches to them.
SOLVER_STRATEGIES: dict[str, str] = {
    "exact": "dense (H + λI)⁻¹ over all tracked layers jointly (small models only)",
    "lissa": "LiSSA stochastic iterative solve, any model size (slow: one solve per scored example)",
}


def available_strategies() -> dict[str, str]:
    """{name: one-line description} of every registered strategy."""
    out = {name: s.description for name, s in STRATEGIES.items()}
    out.update(SOLVER_STRATEGIES)
    return out


def resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """None → the model's device; "auto" → cuda if available else cpu."""
    if device is None:
        for p in model.parameters():
            return p.device
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_dtype(model: nn.Module) -> torch.dtype:
    """Compute dtype: the model's floating dtype, at least float32."""
    for p in model.parameters():
        if p.is_floating_point():
            return torch.promote_types(p.dtype, torch.float32)
    return torch.float32


def iterate_batches(loader: Iterable, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, labels) on ``device`` from batches whose first two items are those."""
    for inputs, labels, _index in iterate_indexed_batches(loader, device):
        yield inputs, labels


def autocast(device: torch.device, amp: str | None):
    """Autocast context for the model's forward/backward (``amp`` None → no-op).

    Only the model runs in reduced precision; captured activations and gradients are cast
    back to float32 (ActivationCapture) and every accumulation stays float32/64.
    """
    import contextlib

    if not amp:
        return contextlib.nullcontext()
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    if amp not in dtypes:
        raise InfluenceError(f"amp must be bfloat16, float16 or null, not {amp!r}")
    return torch.autocast(device_type=device.type, dtype=dtypes[amp])


def _world(dist: Any) -> int:
    return 1 if dist is None else int(getattr(dist, "world_size", 1))


def _reduce_sums(dist: Any, tensors: dict[str, Tensor], counts: dict[str, int]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """All-reduce (sum) un-normalised accumulators and integer counts over ranks."""
    if _world(dist) <= 1:
        return tensors, counts
    out = {key: dist.all_reduce_sum(tensors[key].to(torch.float64)) for key in sorted(tensors)}
    keys = sorted(counts)
    summed = dist.all_reduce_sum(torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64))
    return out, {k: int(round(float(v))) for k, v in zip(keys, summed.tolist())}


def iterate_indexed_batches(
    loader: Iterable, device: torch.device
) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """(inputs, labels, example indices or None) on ``device``; the indices are a batch's
    third item when it is an integer tensor of the batch's length (BatchLoader yields the
    global index of every example there)."""
    for batch in loader:
        if isinstance(batch, dict):
            raise InfluenceError("batches must be (inputs, labels, ...) sequences, not dicts")
        inputs, labels = batch[0], batch[1]
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        index = None
        if len(batch) > 2:
            third = batch[2]
            if not isinstance(third, Tensor):
                try:
                    third = torch.as_tensor(third)
                except (TypeError, ValueError, RuntimeError):
                    third = None
            if (
                third is not None
                and third.dim() == 1
                and len(third) == len(labels)
                and not third.is_floating_point()
                and not third.is_complex()
            ):
                index = third.cpu().to(torch.int64)
        yield inputs.to(device, non_blocking=True), labels.to(device=device, dtype=torch.long), index


_MASK64 = (1 << 64) - 1


def _splitmix64(x):
    import numpy as np

    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_fisher_labels(probs: Tensor, seed: int, index: Tensor) -> Tensor:
    """One label per row drawn from ``probs`` (n, C), keyed by (seed, example index).

    Exponential race: label = argmax_c p_c / E_c with E_c = −log u_c and u_c a
    counter-based uniform of (seed, index, c). So an example gets the same label whatever
    the batch size, loader order or shard it is seen in (single process, torchrun ranks
    and --shard jobs agree), and both fitting passes see the same labels.
    """
    import numpy as np

    n, classes = probs.shape
    idx = index.cpu().numpy().astype(np.uint64)
    key = _splitmix64(np.uint64(int(seed) & _MASK64))
    with np.errstate(over="ignore"):
        counter = idx[:, None] * np.uint64(classes) + np.arange(classes, dtype=np.uint64)[None, :]
        bits = _splitmix64(counter ^ key)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (2.0**-53)
    race = probs.detach().cpu().to(torch.float64) / torch.from_numpy(-np.log(u))
    return race.argmax(1)


def captured_batches(
    ctx: FitContext, stage: str, workspace: Workspace | None = None
) -> Iterator[tuple[int, dict[str, LayerBatch]]]:
    """(batch size, {layer: (a, g)}) per batch, with Fisher labels as configured.

    True-Fisher labels are drawn per example from (seed, example index) — the loader's
    third batch item when it carries indices, else the position in loader order — so
    both fitting passes, any batching and any sharding see the same labels. The yielded
    tensors may live in ``workspace`` (valid until the next batch) unless it is disabled.
    """
    capture = ActivationCapture(ctx.modules, workspace=workspace or Workspace())
    offset = 0
    with torch.no_grad(), eval_mode(ctx.model), capture:
        for inputs, labels, index in iterate_indexed_batches(ctx.loader, ctx.device):
            n = int(labels.shape[0])
            if index is None:
                index = torch.arange(offset, offset + n)
            offset += n
            with autocast(ctx.device, ctx.amp):
                logits = capture.forward(ctx.model, inputs)
            if ctx.fisher == "true":
                probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)
                labels = sample_fisher_labels(probs, ctx.seed, index).to(logits.device)
            with torch.enable_grad(), autocast(ctx.device, ctx.amp):
                loss = F.cross_entropy(logits, labels, reduction="sum")
                layers = capture.gradients(loss)
            del logits, loss
            yield n, layers
            if ctx.on_batch is not None:
                ctx.on_batch(stage, n)


_GRAM_BLOCKS = 3
_GRAM_MIN_DIM = 256


def _accumulate_gram(acc: Tensor, x: Tensor) -> None:
    """acc += xᵀx for a tall (rows, d) matrix, in place (no temporaries).

    For wide matrices only the upper block-triangle is accumulated (⅔ of the flops with
    3 blocks; torch has no syrk); call ``_mirror_upper`` once at the end.
    """
    d = x.shape[1]
    if not _blocked_gram(d):
        acc.addmm_(x.T, x)
        return
    edges = [round(i * d / _GRAM_BLOCKS) for i in range(_GRAM_BLOCKS + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        acc[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:])


def _blocked_gram(d: int) -> bool:
    return d >= _GRAM_MIN_DIM


def _mirror_upper(acc: Tensor) -> Tensor:
    """Complete a matrix whose upper block-triangle was accumulated by _accumulate_gram."""
    d = acc.shape[0]
    if not _blocked_gram(d):
        return acc
    edges = [round(i * d / _GRAM_BLOCKS) for i in range(_GRAM_BLOCKS + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        acc[hi:, lo:hi] = acc[lo:hi, hi:].T
    return acc


def _accumulate_gram_positions(acc: Tensor, g: Tensor, ws: Workspace) -> None:
    """acc += Σ_i Σ_p g_ip g_ipᵀ for g (n, P, d): one GEMM when rows are contiguous, else
    (conv captures, where g is a transposed view) a batched matmul on the natural layout."""
    n, positions, d = g.shape
    if positions == 1 or g.is_contiguous():
        _accumulate_gram(acc, g.reshape(-1, d))
        return
    if d > positions:  # per-example d×d products would outgrow g itself: copy rows
        rows = ws.get("gram_rows", (n, positions, d), g)
        rows.copy_(g)
        _accumulate_gram(acc, rows.view(-1, d))
        return
    g_t = g.transpose(1, 2)
    per_example = torch.bmm(g_t, g_t.transpose(1, 2), out=ws.get("gram", (n, d, d), g))
    acc.add_(torch.sum(per_example, 0, out=ws.get("gram_sum", (d, d), g)))


def _fit_covariances(
    ctx: FitContext, cache_bytes: int = 0
) -> tuple[dict[str, Tensor], dict[str, Tensor], int, list[BatchData] | None]:
    """Pass 1: A = E_{i,p}[a aᵀ], S = E_i[Σ_p g gᵀ] in float64.

    With ``cache_bytes`` > 0, also keeps copies of the captured (a, g) while they fit in
    that many bytes, so pass 2 can skip its forward/backward (the sampled Fisher labels
    are identical in both passes anyway). Returns the cache, or None if it overflowed.
    The sums are all-reduced over ranks (``ctx.dist``) before normalisation.
    """
    sums, cache = _covariance_sums(ctx, cache_bytes)
    sums = sums.reduced(ctx.dist)
    if sums.examples == 0:
        raise InfluenceError("the data loader yielded no examples")
    cov_a, cov_s = sums.normalised()
    return cov_a, cov_s, sums.examples, cache


def _covariance_sums(ctx: FitContext, cache_bytes: int = 0) -> tuple["CovarianceSums", list[BatchData] | None]:
    """Pass-1 accumulators of this process's loader (not reduced), plus the pass cache."""
    cache: list[BatchData] | None = [] if cache_bytes > 0 else None
    cached = 0
    acc_a: dict[str, Tensor] = {}
    acc_s: dict[str, Tensor] = {}
    positions: dict[str, int] = {}
    perms: dict[str, Tensor | None] = {}
    total = 0
    ws = Workspace()
    capture_ws = Workspace()
    for n, layers in captured_batches(ctx, "covariance", capture_ws):
        total += n
        for name, batch in layers.items():
            d_in, d_out = batch.a.shape[2], batch.g.shape[2]
            a2 = batch.a.reshape(-1, d_in)
            if name not in acc_a:
                acc_a[name] = torch.zeros(d_in, d_in, dtype=a2.dtype, device=a2.device)
                acc_s[name] = torch.zeros(d_out, d_out, dtype=a2.dtype, device=a2.device)
                positions[name] = 0
                perms[name] = batch.perm
            _accumulate_gram(acc_a[name], a2)
            _accumulate_gram_positions(acc_s[name], batch.g, ws)
            positions[name] += a2.shape[0]
        if cache is not None:
            size = sum(
                (b.a.numel() + b.g.numel()) * b.a.element_size() for b in layers.values()
            )
            cached += size
            if not cache:  # first batch: give up at once if the whole set cannot fit
                expected = _expected_examples(ctx.loader, n)
                if expected is not None and size * expected / n > cache_bytes:
                    cached = cache_bytes + 1
            if cached > cache_bytes:
                cache = None
                capture_ws.enabled = True
            elif capture_ws.enabled:  # first batch: its tensors live in the workspace
                cache.append(
                    (n, {k: LayerBatch(b.a.clone(), b.g.clone(), b.perm) for k, b in layers.items()})
                )
                capture_ws.enabled = False  # later batches are fresh tensors: keep them
            else:
                cache.append((n, layers))
    if total == 0 and _world(ctx.dist) <= 1:
        raise InfluenceError("the data loader yielded no examples")
    return CovarianceSums(
        {name: to_weight_order(to_weight_order(_mirror_upper(acc).to(torch.float64), perms[name], 0), perms[name], 1)
         for name, acc in acc_a.items()},
        {name: _mirror_upper(acc).to(torch.float64) for name, acc in acc_s.items()},
        dict(positions),
        total,
    ), cache


@dataclass
class CovarianceSums:
    """Pass-1 accumulators before normalisation, weight column order, float64:
    Σ_{i,p} a aᵀ and Σ_i Σ_p g gᵀ per layer, positions seen per layer, examples seen.
    Sums of disjoint shards add up to the sums of the whole set."""

    a: dict[str, Tensor]
    s: dict[str, Tensor]
    positions: dict[str, int]
    examples: int

    def reduced(self, dist: Any) -> "CovarianceSums":
        if _world(dist) <= 1:
            return self
        tensors = {**{f"{k}::A": v for k, v in self.a.items()}, **{f"{k}::S": v for k, v in self.s.items()}}
        counts = {**{f"{k}::positions": v for k, v in self.positions.items()}, "examples": self.examples}
        tensors, counts = _reduce_sums(dist, tensors, counts)
        names = list(self.a)
        return CovarianceSums(
            {k: tensors[f"{k}::A"] for k in names},
            {k: tensors[f"{k}::S"] for k in names},
            {k: counts[f"{k}::positions"] for k in names},
            counts["examples"],
        )

    def __add__(self, other: "CovarianceSums") -> "CovarianceSums":
        if set(self.a) != set(other.a):
            raise InfluenceError("covariance sums of different layer sets cannot be added")
        return CovarianceSums(
            {k: self.a[k] + other.a[k] for k in self.a},
            {k: self.s[k] + other.s[k] for k in self.s},
            {k: self.positions[k] + other.positions[k] for k in self.positions},
            self.examples + other.examples,
        )

    def normalised(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        cov_a = {k: v / self.positions[k] for k, v in self.a.items()}
        cov_s = {k: v / self.examples for k, v in self.s.items()}
        return cov_a, cov_s

    def tensors(self) -> dict[str, Tensor]:
        return {**{f"{k}::A": v for k, v in self.a.items()}, **{f"{k}::S": v for k, v in self.s.items()}}

    def counts(self) -> dict[str, int]:
        return {**{f"{k}::positions": v for k, v in self.positions.items()}, "examples": self.examples}

    @classmethod
    def from_parts(cls, tensors: dict[str, Tensor], counts: dict[str, int]) -> "CovarianceSums":
        names = sorted(k[: -len("::A")] for k in tensors if k.endswith("::A"))
        return cls(
            {k: tensors[f"{k}::A"].to(torch.float64) for k in names},
            {k: tensors[f"{k}::S"].to(torch.float64) for k in names},
            {k: int(counts[f"{k}::positions"]) for k in names},
            int(counts["examples"]),
        )


def _eigh_all(matrices: dict[Any, Tensor], dist: Any = None) -> dict[Any, tuple[Tensor, Tensor]]:
    """Symmetric eigendecompositions in float64, checked for finiteness first.

    On the CPU, LAPACK's eigh scales badly with threads on small matrices, so each runs
    single-threaded while several run side by side. With a process group (``dist``), the
    matrices are dealt round-robin by size over the ranks and broadcast from their owner.
    """
    if _world(dist) > 1:
        return _eigh_distributed(matrices, dist)
    for key, mat in matrices.items():
        if not bool(torch.isfinite(mat).all()):
            layer, which = key
            raise InfluenceError(
                f"non-finite {which} covariance in layer {layer!r}: its activations or "
                "gradients overflowed or contain NaN (check inputs, checkpoint and learning rate)"
            )

    def one(mat: Tensor) -> tuple[Tensor, Tensor]:
        mat = mat.to(torch.float64)
        mat = 0.5 * (mat + mat.T)
        evals, evecs = torch.linalg.eigh(mat)
        return evals.clamp_(min=0.0), evecs

    items = sorted(matrices.items(), key=lambda kv: -kv[1].shape[0])
    on_cpu = all(m.device.type == "cpu" for m in matrices.values())
    threads = torch.get_num_threads()
    if not on_cpu or threads <= 1 or len(items) == 1:
        return {key: one(mat) for key, mat in items}
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(lambda kv: one(kv[1]), items))
    finally:
        torch.set_num_threads(threads)
    return {key: res for (key, _), res in zip(items, results)}


def _eigh_distributed(matrices: dict[Any, Tensor], dist: Any) -> dict[Any, tuple[Tensor, Tensor]]:
    # Same key order on every rank (sizes, then the key's text) so owners agree.
    items = sorted(matrices.items(), key=lambda kv: (-kv[1].shape[0], str(kv[0])))
    owner = {key: i % dist.world_size for i, (key, _m) in enumerate(items)}
    mine = {key: mat for key, mat in items if owner[key] == dist.rank}
    local = _eigh_all(mine) if mine else {}
    out: dict[Any, tuple[Tensor, Tensor]] = {}
    for key, mat in items:
        d = mat.shape[0]
        if key in local:
            evals, evecs = local[key]
        else:
            evals = torch.empty(d, dtype=torch.float64, device=mat.device)
            evecs = torch.empty(d, d, dtype=torch.float64, device=mat.device)
        evals = dist.broadcast(evals.contiguous(), owner[key])
        evecs = dist.broadcast(evecs.contiguous(), owner[key])
        out[key] = (evals, evecs)
    return out


def bases_from_covariances(sums: CovarianceSums, dist: Any = None) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """{layer: (λ_S, Q_S, λ_A, Q_A)} from (merged) pass-1 sums: normalise, eigendecompose."""
    cov_a, cov_s = sums.normalised()
    return _eigen_bases(cov_a, cov_s, dist)


def _eigen_bases(
    cov_a: dict[str, Tensor], cov_s: dict[str, Tensor], dist: Any = None
) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """{layer: (λ_S, Q_S, λ_A, Q_A)}: every A and S eigendecomposed (spread over ranks)."""
    mats: dict[tuple[str, str], Tensor] = {}
    for name in cov_a:
        mats[(name, "activation (A)")] = cov_a[name]
        mats[(name, "output-gradient (S)")] = cov_s[name]
    eig = _eigh_all(mats, dist)
    s_key, a_key = "output-gradient (S)", "activation (A)"
    return {
        name: (eig[(name, s_key)][0], eig[(name, s_key)][1], eig[(name, a_key)][0], eig[(name, a_key)][1])
        for name in cov_a
    }


def _layer_info(ctx: FitContext, name: str) -> tuple[str, int, int, bool]:
    module = ctx.modules[name]
    d_out, d_in, has_bias = layer_shape(module)
    return layer_kind(module), d_out, d_in, has_bias


def _fit_kfac_bases(
    ctx: FitContext, cache_bytes: int = 0
) -> tuple[dict[str, tuple[Tensor, Tensor, Tensor, Tensor]], int, list[BatchData] | None]:
    """Pass 1 + eigendecomposition: {layer: (λ_S, Q_S, λ_A, Q_A)}, example count, cache."""
    cov_a, cov_s, total, cache = _fit_covariances(ctx, cache_bytes)
    return _eigen_bases(cov_a, cov_s, ctx.dist), total, cache


def _replay(ctx: FitContext, cache: list[BatchData], stage: str):
    """Iterate cached batches as if they were captured again (with progress)."""
    for n, layers in cache:
        yield n, layers
        if ctx.on_batch is not None:
            ctx.on_batch(stage, n)


def _fit_eigenvalues(
    ctx: FitContext,
    bases: dict[str, tuple[Tensor | None, Tensor | None]],
    cache: list[BatchData] | None = None,
    expected: int | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Pass 2: Λ_jk = (1/N) Σ_i (Q_Sᵀ G_i Q_A)_jk² per layer, bases given as (Q_S, Q_A).

    The sums are all-reduced over ranks (``ctx.dist``) before normalisation.
    """
    sums, total = _eigenvalue_sums(ctx, bases, cache)
    sums, counts = _reduce_sums(ctx.dist, sums, {"examples": total})
    total = counts["examples"]
    if expected is not None and total != expected:
        raise InfluenceError(
            f"the data loader yielded {expected} examples in pass 1 but {total} in pass 2; "
            "it must iterate the same data each time (a re-iterable loader, not an iterator)"
        )
    if total == 0:
        raise InfluenceError("the data loader yielded no examples")
    return {name: value / total for name, value in sums.items()}, total


def _eigenvalue_sums(
    ctx: FitContext,
    bases: dict[str, tuple[Tensor | None, Tensor | None]],
    cache: list[BatchData] | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Pass-2 accumulators Σ_i (Q_Sᵀ G_i Q_A)², float64, weight order; local (not reduced).

    Rank-one layers (P == 1): Λ += (g̃∘g̃)ᵀ (ã∘ã), one matmul per batch, no G_i. Others:
    rotated per-example gradients with the per-side flop rule, in memory-bounded chunks.
    """
    acc: dict[str, Tensor] = {}
    ops: dict[str, tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]] = {}
    perms: dict[str, Tensor | None] = {}
    total = 0
    ws = Workspace()
    source = captured_batches(ctx, "eigenvalues") if cache is None else _replay(ctx, cache, "eigenvalues")
    for n, layers in source:
        total += n
        for name, batch in layers.items():
            a, g = batch.a, batch.g
            d_in, d_out = a.shape[2], g.shape[2]
            if name not in ops:
                q_s, q_a = bases[name]
                perms[name] = batch.perm
                if q_a is not None:  # rows of Q_A follow the captured column order
                    q_a = to_internal_order(q_a.to(a.device), batch.perm, 0)
                q_s = None if q_s is None else q_s.to(device=a.device, dtype=a.dtype)
                q_a = None if q_a is None else q_a.to(dtype=a.dtype)
                ops[name] = (
                    q_s,
                    q_a,
                    None if q_s is None else q_s.T.contiguous(),
                    None if q_a is None else q_a.T.contiguous(),
                )
                acc[name] = torch.zeros(d_out, d_in, dtype=a.dtype, device=a.device)
            q_s, q_a, q_s_t, q_a_t = ops[name]
            if batch.positions == 1 and not ctx.reference:
                # Transposed layout (d, n) so all three products are x @ wᵀ GEMMs:
                # ãᵀ = Q_Aᵀ aᵀ, g̃ᵀ = Q_Sᵀ gᵀ, then Λ += (g̃∘g̃)ᵀ (ã∘ã).
                a_sq = a[:, 0].T.square() if q_a is None else matmul_t(q_a_t, a[:, 0]).square_()
                g_sq = g[:, 0].T.square() if q_s is None else matmul_t(q_s_t, g[:, 0]).square_()
                acc[name].add_(matmul_t(g_sq.contiguous(), a_sq.contiguous()))
            else:
                step = chunk_size(d_out * d_in * 2)
                for start in range(0, n, step):
                    sl = slice(start, start + step)
                    if ctx.reference:
                        rotated = reference_rotated_grads(a[sl], g[sl], q_a, q_s)
                    else:
                        rotated = rotated_per_example_grads(a[sl], g[sl], q_a, q_s, ws, q_a_t)
                    summed = torch.sum(rotated.square_(), 0, out=ws.get("lam_sum", (d_out, d_in), a))
                    acc[name].add_(summed)
    # With an identity A basis the columns of Λ are weight columns: back to weight order.
    sums = {
        name: value.to(torch.float64) if bases[name][1] is not None else to_weight_order(value.to(torch.float64), perms[name], 1)
        for name, value in acc.items()
    }
    return sums, total


def _fit_ekfac(ctx: FitContext) -> tuple[dict[str, LayerFactors], int]:
    bases, total, cache = _fit_kfac_bases(ctx, ctx.cache_bytes)
    qs = {name: (b[1], b[3]) for name, b in bases.items()}
    lam, _ = _fit_eigenvalues(ctx, qs, cache, expected=total)
    del cache
    return _build_layers(ctx, {n: (q[0], q[1], lam[n]) for n, q in qs.items()}), total


def _fit_kfac(ctx: FitContext) -> tuple[dict[str, LayerFactors], int]:
    bases, total, _ = _fit_kfac_bases(ctx)
    out = {name: (q_s, q_a, torch.outer(l_s, l_a)) for name, (l_s, q_s, l_a, q_a) in bases.items()}
    return _build_layers(ctx, out), total


def _fit_diagonal(ctx: FitContext) -> tuple[dict[str, LayerFactors], int]:
    lam, total = _fit_eigenvalues(ctx, {name: (None, None) for name in ctx.modules})
    return _build_layers(ctx, {n: (None, None, v) for n, v in lam.items()}), total


def _fit_identity(ctx: FitContext) -> tuple[dict[str, LayerFactors], int]:
    total = _reduce_sums(ctx.dist, {}, {"examples": _count_examples(ctx.loader)})[1]["examples"]
    out = {}
    for name in ctx.modules:
        _kind, d_out, d_in, _bias = _layer_info(ctx, name)
        out[name] = (None, None, torch.zeros(d_out, d_in, dtype=torch.float64))
    return _build_layers(ctx, out), total


def _expected_examples(loader: Iterable, first_batch: int) -> int | None:
    """How many examples the loader will yield, if it can tell without iterating."""
    count = getattr(loader, "num_examples", None)
    if isinstance(count, int):
        return count
    try:
        return len(loader) * first_batch  # type: ignore[arg-type]
    except TypeError:
        pass
    dataset = getattr(loader, "dataset", None)
    try:
        return None if dataset is None else len(dataset)
    except TypeError:
        return None


def _count_examples(loader: Iterable) -> int:
    """Examples the loader yields (a ``num_examples`` attribute, else one pass over it;
    ``len(loader.dataset)`` is not trusted: samplers and index subsets change it)."""
    count = getattr(loader, "num_examples", None)
    if isinstance(count, int):
        return count
    return sum(int(len(batch[1])) for batch in loader)


def _build_layers(
    ctx: FitContext, parts: dict[str, tuple[Tensor | None, Tensor | None, Tensor]]
) -> dict[str, LayerFactors]:
    layers = {}
    for name in ctx.modules:
        if name not in parts:
            raise InfluenceError(f"tracked module {name!r} received no data while fitting")
        q_s, q_a, lam = parts[name]
        kind, d_out, d_in, has_bias = _layer_info(ctx, name)
        if not bool(torch.isfinite(lam).all()):
            raise InfluenceError(f"non-finite eigenvalues in layer {name!r}")
        layers[name] = LayerFactors(
            name=name,
            kind=kind,
            d_out=d_out,
            d_in=d_in,
            has_bias=has_bias,
            q_s=q_s,
            q_a=q_a,
            eigenvalues=lam.to(torch.float64),
            damping=math.nan,
        )
    return layers


register_strategy(
    Strategy("ekfac", "eigenvalue-corrected Kronecker factors (default; most accurate)", _fit_ekfac)
)
register_strategy(Strategy("kfac", "Kronecker factors A ⊗ S, no eigenvalue correction", _fit_kfac))
register_strategy(Strategy("diagonal", "diagonal of the Fisher (per-weight variances)", _fit_diagonal))
register_strategy(
    Strategy(
        "identity",
        "no curvature: plain gradient inner products (damping has no effect)",
        _fit_identity,
        fixed_damping=1.0,
    )
)


def _damping_value(rule: str | float, lam: Tensor, factor: float = AUTO_DAMPING_SCALE) -> float:
    if isinstance(rule, str):
        if rule != "auto":
            raise InfluenceError(f"damping must be 'auto' or a positive number, not {rule!r}")
        value = float(factor) * float(lam.to(torch.float64).mean())
        # A layer whose curvature is exactly zero gets λ = 1 (plain gradients) instead of 0.
        return value if value > 0.0 else 1.0
    value = float(rule)
    if not math.isfinite(value) or value <= 0.0:
        raise InfluenceError(f"damping must be 'auto' or a positive number, not {rule!r}")
    return value


def fit_factors(
    model: nn.Module,
    loader: Iterable,
    strategy: str = "ekfac",
    *,
    damping: str | float = "auto",
    fisher: str = "true",
    modules: list[str] | dict[str, nn.Module] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    on_batch: ProgressCallback | None = None,
    reference: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    damping_factor: float | None = None,
    damping_scope: str = "global",
    dist: Any = None,
    amp: str | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """Fit per-layer curvature factors of ``model`` on ``loader``.

    strategy "exact" / "lissa" return an ExactSolver / LissaSolver instead of Factors
    (see ``influence.solvers``); ``options`` are their strategy-specific keyword
    arguments (e.g. {"max_params": 50000} or {"depth": 2000, "scale": 50.0}). ``fisher``,
    ``reference`` and ``cache_bytes`` do not apply to them.

    loader: iterable of batches whose first two items are inputs and integer labels.
    fisher: "true" samples labels from the model's predictive distribution (seeded,
        deterministic given ``seed`` and loader order); "empirical" uses the labels.
    modules: fnmatch patterns of module names (or a ready {name: module} dict); None
        tracks every Linear/Conv2d.
    damping: "auto" = damping_factor × the mean eigenvalue (None: the strategy's measured
        default, ``DEFAULT_DAMPING_FACTORS``: 0.1, exact/lissa 3), or one positive number
        for every layer. damping_scope "layer": the mean of each layer's own Λ (each layer
        its own λ); "global": the mean over every tracked weight of every layer (one λ for
        all, as in H + λI over the whole parameter space).
    device: None = the model's device, "auto" = cuda if available; the model is moved there.
    dtype: storage dtype of the fitted tensors (accumulation is float32/64, eigh float64).
    on_batch(stage, n): progress callback after each batch ("covariance", "eigenvalues").
    reference: use the slow explicit-G_i path in pass 2 (for tests).
    cache_bytes: EK-FAC keeps pass 1's captured (a, g) for pass 2 when they fit in this
        many bytes, saving a forward/backward over the data; 0 disables.
    dist: None, or a process-group context (``influence_cli.distributed.DistContext``:
        ``world_size``, ``rank``, ``all_reduce_sum``, ``broadcast``). Each rank passes a
        loader over its own disjoint shard; covariance and eigenvalue sums and counts are
        all-reduced before normalisation and the eigendecompositions are shared out by
        layer and broadcast, so every rank returns the factors of the whole data set.
    amp: "bfloat16" / "float16" autocast the model's forward/backward; accumulation stays
        float32/64.
    """
    if damping_factor is None:
        damping_factor = default_damping_factor(strategy)
    if strategy in SOLVER_STRATEGIES:
        from influence_cli.influence import solvers

        common: dict[str, Any] = {
            "damping": damping, "damping_factor": damping_factor, "modules": modules, "device": device,
            "on_batch": on_batch,
        }
        if strategy == "exact":
            common["dtype"] = dtype
        else:
            common["seed"] = seed
        opts = dict(options or {})
        clash = sorted(set(opts) & set(common))
        if clash:
            raise InfluenceError(f"{strategy}: pass {', '.join(clash)} as fit_factors arguments, not options")
        fit = solvers.fit_exact if strategy == "exact" else solvers.fit_lissa
        known = set(inspect.signature(fit).parameters) - {"model", "loader"} - set(common)
        unknown = sorted(set(opts) - known)
        if unknown:
            raise InfluenceError(
                f"{strategy}: unknown options {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return fit(model, loader, **common, **opts)
    if options:
        raise InfluenceError(f"strategy {strategy!r} takes no options, got {sorted(options)}")
    if strategy not in STRATEGIES:
        raise InfluenceError(
            f"unknown strategy {strategy!r}; available: {', '.join(sorted(available_strategies()))}"
        )
    spec = STRATEGIES[strategy]
    if spec.fixed_damping is None:
        _damping_value(damping, torch.ones(1), damping_factor)  # validate early, before any data pass
        if not (math.isfinite(float(damping_factor)) and float(damping_factor) > 0):
            raise InfluenceError(f"damping_factor must be a positive number, not {damping_factor!r}")
    if damping_scope not in ("layer", "global"):
        raise InfluenceError(f"damping_scope must be 'layer' or 'global', not {damping_scope!r}")
    ctx = _make_context(model, loader, fisher, modules, device, seed, on_batch, amp, reference, cache_bytes, dist)
    layers, total = spec.fit(ctx)
    return _finalise(strategy, layers, total, damping, fisher, dtype, damping_factor, damping_scope)


def _finalise(
    strategy: str,
    layers: dict[str, LayerFactors],
    total: int,
    damping: str | float,
    fisher: str,
    dtype: torch.dtype,
    damping_factor: float | None = None,
    damping_scope: str = "global",
) -> Factors:
    """Damping per layer and the storage dtype: the last step of every fit."""
    spec = STRATEGIES[strategy]
    if damping_factor is None:
        damping_factor = default_damping_factor(strategy)
    pooled = None
    if damping_scope == "global" and layers:
        pooled = torch.cat([layer.eigenvalues.reshape(-1).to(torch.float64) for layer in layers.values()])
    for layer in layers.values():
        if spec.fixed_damping is not None:
            layer.damping = spec.fixed_damping
        else:
            source = layer.eigenvalues if pooled is None else pooled
            layer.damping = _damping_value(damping, source, damping_factor)
        layer.eigenvalues = layer.eigenvalues.to(dtype)
        if layer.q_s is not None:
            layer.q_s = layer.q_s.to(dtype)
        if layer.q_a is not None:
            layer.q_a = layer.q_a.to(dtype)
    return Factors(
        strategy=strategy,
        damping_rule=damping if spec.fixed_damping is None else "none",
        fisher=fisher,
        num_examples=total,
        layers=layers,
    )


# ------------------------------------------------------- sharded fitting (job arrays)
# ``--shard i/n`` jobs have no process group: each writes its un-normalised sums, and a
# merge adds them. EK-FAC needs two rounds (pass 2 rotates into the merged pass-1 bases).
SHARDABLE = {"ekfac": ("covariance", "eigenvalues"), "kfac": ("covariance",), "diagonal": ("eigenvalues",), "identity": ()}


def _make_context(
    model: nn.Module, loader: Iterable, fisher: str, modules: Any, device: Any, seed: int,
    on_batch: ProgressCallback | None, amp: str | None, reference: bool = False, cache_bytes: int = 0,
    dist: Any = None,
) -> FitContext:
    """Validated fitting context: Fisher mode, the model on its device, the tracked layers."""
    if fisher not in ("true", "empirical"):
        raise InfluenceError(f"fisher must be 'true' or 'empirical', not {fisher!r}")
    dev = resolve_device(model, device)
    if any(p.device != dev for p in model.parameters()):
        model.to(dev)
    tracked = modules if isinstance(modules, dict) else select_modules(model, modules)
    if not tracked:
        raise InfluenceError("nothing to track: the module selection is empty")
    return FitContext(model, loader, tracked, dev, fisher, seed, on_batch, reference, cache_bytes, dist, amp)


def covariance_sums(
    model: nn.Module, loader: Iterable, *, fisher: str = "true", modules: Any = None, device: Any = None,
    seed: int = 0, on_batch: ProgressCallback | None = None, amp: str | None = None,
) -> CovarianceSums:
    """Pass 1 on this loader only, un-normalised (a shard's contribution)."""
    ctx = _make_context(model, loader, fisher, modules, device, seed, on_batch, amp)
    return _covariance_sums(ctx, 0)[0]


def eigenvalue_sums(
    model: nn.Module, loader: Iterable, bases: dict[str, tuple[Tensor | None, Tensor | None]], *,
    fisher: str = "true", modules: Any = None, device: Any = None, seed: int = 0,
    on_batch: ProgressCallback | None = None, amp: str | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Pass 2 on this loader only, un-normalised: ({layer: Σ_i (Q_Sᵀ G_i Q_A)²}, examples).
    ``bases`` = {layer: (Q_S, Q_A)} (None = identity, the diagonal strategy)."""
    ctx = _make_context(model, loader, fisher, modules, device, seed, on_batch, amp)
    return _eigenvalue_sums(ctx, bases)


def factors_from_sums(
    model: nn.Module,
    strategy: str,
    *,
    covariance: CovarianceSums | None = None,
    eigenvalues: tuple[dict[str, Tensor], int] | None = None,
    bases: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] | None = None,
    num_examples: int | None = None,
    damping: str | float = "auto",
    fisher: str = "true",
    modules: Any = None,
    dtype: torch.dtype = torch.float32,
    damping_factor: float | None = None,
    damping_scope: str = "global",
) -> Factors:
    """The Factors a single fit would give, from merged shard sums.

    ekfac: ``bases`` (from :func:`bases_from_covariances`) + merged ``eigenvalues``;
    kfac: ``covariance`` (or ``bases``); diagonal: ``eigenvalues``; identity: ``num_examples``.
    """
    if strategy not in SHARDABLE:
        raise InfluenceError(f"strategy {strategy!r} cannot be fitted in shards (use one of {', '.join(SHARDABLE)})")
    tracked = modules if isinstance(modules, dict) else select_modules(model, modules)
    ctx = FitContext(model, [], tracked, torch.device("cpu"), fisher, 0, None)
    if strategy in ("ekfac", "kfac") and bases is None:
        if covariance is None:
            raise InfluenceError(f"{strategy}: merged pass-1 covariances are needed")
        bases = bases_from_covariances(covariance)
    if strategy == "kfac":
        assert bases is not None
        total = covariance.examples if covariance is not None else int(num_examples or 0)
        parts = {name: (q_s, q_a, torch.outer(l_s, l_a)) for name, (l_s, q_s, l_a, q_a) in bases.items()}
    elif strategy in ("ekfac", "diagonal"):
        if eigenvalues is None:
            raise InfluenceError(f"{strategy}: merged pass-2 eigenvalue sums are needed")
        sums, total = eigenvalues
        if total <= 0:
            raise InfluenceError("the shards hold no examples")
        if strategy == "ekfac":
            assert bases is not None
            parts = {name: (b[1], b[3], sums[name] / total) for name, b in bases.items()}
        else:
            parts = {name: (None, None, sums[name] / total) for name in tracked}
    else:
        total = int(num_examples or 0)
        parts = {}
        for name in tracked:
            _kind, d_out, d_in, _bias = _layer_info(ctx, name)
            parts[name] = (None, None, torch.zeros(d_out, d_in, dtype=torch.float64))
    return _finalise(strategy, _build_layers(ctx, parts), total, damping, fisher, dtype, damping_factor, damping_scope)


def dense_preconditioner(layer: LayerFactors) -> Tensor:
    """Reference (Q_S ⊗ Q_A) diag(vec(Λ) + λ)⁻¹ (Q_S ⊗ Q_A)ᵀ, row-major vec, float64.

    Size (d_out·d_in)²: only for tiny layers in tests.
    """
    q_s = torch.eye(layer.d_out, dtype=torch.float64) if layer.q_s is None else layer.q_s.double().cpu()
    q_a = torch.eye(layer.d_in, dtype=torch.float64) if layer.q_a is None else layer.q_a.double().cpu()
    basis = torch.kron(q_s, q_a)
    inv = 1.0 / (layer.eigenvalues.double().cpu().reshape(-1) + layer.damping)
    return (basis * inv) @ basis.T
