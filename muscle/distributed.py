"""torchrun data parallelism, kept small: who am I, a barrier, and token-weighted loss scaling.

Under ``torchrun --nproc_per_node N`` every rank sees RANK / WORLD_SIZE / LOCAL_RANK in its
environment. Each rank takes its own slice of every *global* batch (``batch_size`` examples per
rank), so N ranks with batch size B follow the same trajectory as one process with batch N*B.
Rank 0 alone writes logs, checkpoints and the adapter.

Jobs that only need to agree, not to reduce (the cache build: ranks write disjoint shards),
join with :func:`process_group` (gloo on any device) and let the main rank decide what touches
shared files with :func:`on_main`, so no other rank ever looks at a half-made output.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from muscle import MuscleError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init(device: torch.device, *, always: bool = False) -> DistInfo:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA).

    ``always``: outside torchrun too, as a group of one (DeepSpeed needs a process group).
    """
    info = dist_info()
    if dist.is_initialized() or not (info.enabled or always):
        return info
    backend = "nccl" if device.type == "cuda" else "gloo"
    if info.enabled:
        dist.init_process_group(backend=backend)
    else:  # a group of one, in-process; the environment as torchrun would set it (DeepSpeed reads it)
        for name in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(name, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return info


@contextmanager
def process_group(backend: str = "gloo") -> Iterator[DistInfo]:
    """Join torchrun's process group for the ``with`` body (nothing outside torchrun), and
    leave it afterwards if this call joined it. gloo by default: barriers and small objects
    only, on any device."""
    info = dist_info()
    joined = info.enabled and not dist.is_initialized()
    if joined:
        dist.init_process_group(backend=backend)
    try:
        yield info
    finally:
        if joined:
            dist.destroy_process_group()


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on the main rank only; every rank returns its result (which must pickle).

    The other ranks wait for it, so they never see what the main rank is still creating. An
    error on the main rank is raised on every rank, as a MuscleError with the same line (and
    the original exception on the main rank): no rank waits forever for a main rank that
    refused.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:
            box[0] = ("error", str(e) if isinstance(e, MuscleError) else f"{type(e).__name__}: {e}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise MuscleError(f"rank 0: {value}")
    return value


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def token_weight(n_local: float, device: torch.device) -> float:
    """Factor that turns this rank's per-token mean loss into its share of the global mean.

    DDP averages gradients over ranks; multiplying each rank's mean by
    ``world * n_local / n_global`` makes that average the mean over all tokens of the global
    batch, exactly what one process would compute.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1.0
    n_global = all_reduce_sum(n_local, device)
    return dist.get_world_size() * n_local / max(n_global, 1.0)
