"""The process group of a tensor-parallel LLM on one node: gloo on CPU, NCCL on CUDA, every
collective bounded by a timeout (a rank that hangs fails the step instead of hanging it).

    group_name = join(rank, world, init_method, device)   # blocks until every rank joined
    leave()

NVLink multicast stays off (the shared GPU hosts here forbid it): `NCCL_NVLS_ENABLE=0` and
`TORCH_SYMM_MEM_DISABLE_MULTICAST=1` are set before NCCL starts, in every rank's process.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

# Seconds a collective may wait for the other ranks. Above a rank's first-call compilation
# (each rank compiles its own graphs; the all-reduces of the first call wait for the slowest).
COLLECTIVE_TIMEOUT_S = 300.0
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def join(rank: int, world: int, init_method: str, device: torch.device,
         timeout_s: float = COLLECTIVE_TIMEOUT_S) -> str:
    """Join the default process group; returns its name (what the all-reduce op takes)."""
    if dist.is_initialized():
        raise RuntimeError("this process already has a torch.distributed process group (another tensor-parallel "
                           "LLM, or torchrun's): shut that one down first; one tensor-parallel LLM a process")
    os.environ.update(NO_MULTICAST_ENV)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    return dist.group.WORLD.group_name


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
