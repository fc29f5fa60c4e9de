"""Multi-process training (torchrun / DistributedDataParallel) helpers.

Launch: ``torchrun --nproc_per_node N -m spml_deploy.cli train ...`` (or ``--nnodes`` for several
machines). Every process takes ``batch / N`` images of each step; the segment pool of the
relationships A, C and O spans the whole batch: each process all-gathers the per-segment
prototypes of the others (spec 3.6, pitfall 7). Segments never span processes, so gathering the
normalised prototypes is exact; the gather is differentiable, so every process's pixels push
gradients into the prototypes of the other processes' images.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def from_environment() -> DistInfo:
    """Process placement as torchrun sets it (WORLD_SIZE, RANK, LOCAL_RANK); single otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) when running under torchrun."""
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def _all_gather_rows(t: Tensor, counts: list[int]) -> Tensor:
    """Concatenate every process's ``t`` ([n_r, ...], n_r = counts[r]) in rank order.

    Differentiable: the gradient of the gathered tensor flows back to each process's rows.
    """
    from torch.distributed.nn.functional import all_gather as diff_all_gather

    n_max = max(counts)
    pad = torch.zeros((n_max - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded = torch.cat([t, pad]) if pad.shape[0] else t
    if t.requires_grad or t.is_floating_point():
        parts = diff_all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def gather_segment_pool(local, images_per_process: int):
    """All-gather a ``SegmentPool`` (current segments of this process) across processes.

    Returns ``(pool, offset)``: the pool of every process in rank order, and the row of this
    process's first segment. Image ids are offset by ``rank * images_per_process`` so that they
    stay unique across processes.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    n = torch.tensor([len(local)], device=local.mu.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    gathered = {}
    for f in fields(local):
        value = getattr(local, f.name)
        if value is None:
            gathered[f.name] = None
            continue
        if f.name == "batch":
            value = value + rank * images_per_process
        gathered[f.name] = _all_gather_rows(value, counts)
    return type(local)(**gathered), sum(counts[:rank])


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a Python number over processes (for logging)."""
    if not active():
        return value
    t = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()
