"""`EngineStats`: the scheduler's and the KV pool's counters at one moment, as /metrics
shows them. Plain values, so they cross a process boundary as they are."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    num_running: int = 0          # sequences in the batch
    num_waiting: int = 0          # sequences waiting for admission
    num_preemptions: int = 0      # sequences preempted (recomputed later), since start
    blocks_used: int = 0          # KV blocks held by sequences
    blocks_free: int = 0          # on the free list
    blocks_cached: int = 0        # holding reusable prefixes, evictable
    blocks_total: int = 0
    prefix_hit_rate: float = 0.0  # prompt tokens found cached / looked up

    @classmethod
    def of(cls, engine) -> EngineStats:
        sched, bm = engine.scheduler, engine.block_manager
        return cls(sched.num_running, sched.num_waiting, sched.num_preemptions, bm.num_used_blocks,
                   bm.num_free_blocks, bm.num_cached_blocks, bm.num_blocks, bm.prefix_hit_rate)
