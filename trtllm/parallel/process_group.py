"""The process groups of a parallel LLM: gloo on CPU, NCCL on CUDA, every collective of the
model bounded by a timeout (a rank that hangs fails the step instead of hanging it).

    groups = join(rank, world, init_method, device, tp_size=tp)   # blocks until every rank joined
    groups.tp_group_name   # this rank's tensor-parallel group (its stage's ranks), for all-reduce
    groups.control         # every rank, gloo: rank 0 hands each step to the others (step_channel.py)
    leave()

The world group carries the pipeline's point-to-point sends (hidden states to the next stage,
logits back to rank 0). `init_method` is a `file://` rendezvous for the workers the library
spawns, or `env://` under torchrun (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE).

NVLink multicast stays off (the shared GPU hosts here forbid it): `NCCL_NVLS_ENABLE=0` and
`TORCH_SYMM_MEM_DISABLE_MULTICAST=1` are set before NCCL starts, in every rank's process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Seconds a collective may wait for the other ranks. Above a rank's first-call compilation
# (each rank compiles its own graphs; the all-reduces of the first call wait for the slowest).
COLLECTIVE_TIMEOUT_S = 300.0
# The control group waits for rank 0's next step, however long the server stays idle; a rank 0
# that dies closes its connections, which ends the wait at once.
CONTROL_TIMEOUT = timedelta(days=365)
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


@dataclass
class Groups:
    tp_group_name: str  # as torch.ops._c10d_functional takes it
    control: object     # a gloo ProcessGroup of every rank


def join(rank: int, world: int, init_method: str, device: torch.device,
         timeout_s: float = COLLECTIVE_TIMEOUT_S, tp_size: int | None = None) -> Groups:
    """Join the default process group and make the tensor-parallel groups (one a pipeline stage:
    ranks s * tp_size .. s * tp_size + tp_size - 1) and the control group."""
    if dist.is_initialized():
        raise RuntimeError("this process already has a torch.distributed process group (another parallel "
                           "LLM, or one made by hand): shut that one down first; one parallel LLM a process")
    os.environ.update(NO_MULTICAST_ENV)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    tp = tp_size or world
    tp_group = dist.group.WORLD
    if tp != world:  # every rank makes every group, in the same order
        for first in range(0, world, tp):
            group = dist.new_group(list(range(first, first + tp)), timeout=timedelta(seconds=timeout_s))
            if first <= rank < first + tp:
                tp_group = group
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return Groups(tp_group.group_name, control)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
