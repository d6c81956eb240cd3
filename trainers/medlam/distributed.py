"""torch.distributed plumbing: one process by default, DistributedDataParallel under `torchrun`.

`torchrun --nproc_per_node N -m medlsam.cli train ...` (or several nodes with --nnodes and a
rendezvous endpoint) sets RANK / WORLD_SIZE / LOCAL_RANK; the process group uses NCCL on GPUs
and gloo on CPUs. Rank 0 preprocesses data, writes checkpoints and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # we created the process group and must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def any_true(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank."""
        if not self.enabled:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def all_gather_strings(self, text: str) -> list[str]:
        if not self.enabled:
            return [text]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, text)
        return out

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def setup(requested_device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment, or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size <= 1:
        return DistContext(0, 1, 0, device, initialized_here=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    initialized_here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        initialized_here = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, initialized_here)
