"""Test helper: run a function on `world` CPU processes joined in a gloo group.

    results = run_ranks(fn, world, *args)   # fn(rank, world, group_name, *args) -> picklable

Each rank's return value comes back through a file (torch.save), in rank order.
"""
from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, init: str, out: str, fn, args) -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # the ops' torch references: as tests/runtime
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = fn(rank, world, dist.group.WORLD.group_name, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        mp.spawn(_rank_main, args=(world, init, tmp, fn, args), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
