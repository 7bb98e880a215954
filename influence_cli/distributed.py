"""torch.distributed helpers: the same commands on several processes under ``torchrun``.

``init_from_env()`` reads what torchrun exports (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and joins the process group: gloo on the CPU, nccl when the
influence device is CUDA. Without those variables (or with WORLD_SIZE=1) it returns a
single-process context whose collectives are no-ops, so every caller can use one code
path.

Contract used by the pipeline: each rank takes a contiguous, disjoint block of the
training set (:func:`shard_range`); sums are all-reduced; eigendecompositions are spread
over ranks by layer and broadcast; score shards are gathered in rank order (= global
index order); only rank 0 writes files and prints.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = [
    "DistContext",
    "init_from_env",
    "current",
    "shard_range",
    "shard_indices",
    "parse_shard",
    "SINGLE",
]


@dataclass
class DistContext:
    """Where this process stands: rank, world size, device for collectives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None = no process group (single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and self.backend is not None

    # ---------------------------------------------------------------- collectives
    def _to_comm(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.device) if tensor.device != self.device else tensor

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over every rank; returns the summed tensor (same device as given)."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        work = self._to_comm(tensor.contiguous())
        if work is tensor:
            work = tensor.clone() if not tensor.is_contiguous() else tensor
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def broadcast(self, tensor: Tensor, src: int) -> Tensor:
        """``tensor`` from rank ``src`` on every rank (others pass a same-shaped buffer)."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        work = self._to_comm(tensor.contiguous())
        dist.broadcast(work, src=src)
        return work.to(tensor.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable; tensors are moved to the CPU), in rank order."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, _cpu(obj))
        return out

    def gather_cat(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """Concatenate variable-length shards of every rank in rank order (on every rank)."""
        if not self.active:
            return tensor
        parts = self.all_gather_object(tensor.detach().cpu())
        return torch.cat(parts, dim=dim)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def destroy(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.backend = None


SINGLE = DistContext()
_CURRENT: DistContext = SINGLE


def _cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    return obj


def current() -> DistContext:
    """The context set by the last :func:`init_from_env` (single process by default)."""
    return _CURRENT


def init_from_env(device: str = "auto", timeout_minutes: float = 30.0) -> DistContext:
    """Join torchrun's process group if its variables are set; otherwise a no-op context.

    device: the influence device setting ("auto", "cpu", "cuda", "cuda:N"); CUDA ranks
    use nccl and ``cuda:LOCAL_RANK``, CPU ranks gloo.
    """
    global _CURRENT
    if _CURRENT.active:
        return _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        _CURRENT = DistContext()
        return _CURRENT
    import torch.distributed as dist

    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        comm_device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        comm_device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    _CURRENT = DistContext(rank, world, local_rank, comm_device, backend)
    atexit.register(_CURRENT.destroy)
    return _CURRENT


def reset() -> None:
    """Leave the process group and go back to single-process (tests, library users)."""
    global _CURRENT
    _CURRENT.destroy()
    _CURRENT = SINGLE


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of shard ``rank`` of ``world`` over n items: contiguous, disjoint,
    deterministic, sizes differing by at most one (the first n % world shards are longer)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard {rank} of {world} does not exist")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_indices(n: int, rank: int, world: int) -> Tensor:
    start, stop = shard_range(n, rank, world)
    return torch.arange(start, stop)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 ≤ i < n; ValueError with a readable message otherwise."""
    try:
        left, right = text.split("/")
        i, n = int(left), int(right)
    except ValueError:
        raise ValueError(f"--shard {text}: expected i/n, e.g. --shard 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: needs 0 <= i < n (shards are numbered from 0)")
    return i, n
