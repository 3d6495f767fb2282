"""`MicroBatches`: under pipeline parallelism, the engine's micro-batches in flight.

Pipeline parallelism (trtllm/parallel, docs/parallel.md) splits the layers into stages on
different ranks; with one step in flight, all but one stage would idle. The engine keeps
`depth` (one a stage) micro-batches in flight instead, each of sequences the others do not
hold (`Scheduler.in_flight`, which the scheduler leaves alone), and each step launches
micro-batches until `depth` are in flight and finishes the oldest (the runner's step
waits for the last stage's logits: `CompiledModel.take_pending`). Depth 1 (no pipeline):
the engine schedules and launches one step at a time itself.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from trtllm.runtime.launched_step import LaunchedStep
from trtllm.runtime.scheduler import Scheduler
from trtllm.runtime.sequence import Sequence


class MicroBatches:
    def __init__(self, depth: int = 1):
        self.depth = depth
        self.in_flight: deque[LaunchedStep] = deque()

    def next(self, scheduler: Scheduler, schedule: Callable[[int], list[tuple[Sequence, int]]],
             execute: Callable[[list[tuple[Sequence, int]]], LaunchedStep]) -> LaunchedStep | None:
        """Launch micro-batches until depth are in flight (or none is left to schedule),
        then the oldest, to finish. The sequences not in flight (and those waiting) are shared out
        evenly among the free places, so the micro-batches are alike in size. `schedule(max_seqs)`
        is the engine's schedule (which finishes the sequences the pool cannot hold)."""
        while len(self.in_flight) < self.depth:
            free = self.depth - len(self.in_flight)
            ready = len(scheduler.waiting) + sum(1 for s in scheduler.running if s not in scheduler.in_flight)
            scheduled = schedule(max(1, math.ceil(ready / free)))
            if not scheduled:
                break
            self.in_flight.append(execute(scheduled))
            scheduler.in_flight.update(seq for seq, _ in scheduled)
        if not self.in_flight:
            return None
        launched = self.in_flight.popleft()
        scheduler.in_flight.difference_update(seq for seq, _ in launched.scheduled)
        return launched

    def forget(self, scheduler: Scheduler) -> None:
        """The parallel group is broken (parallel/workers.py): nothing in flight is read."""
        self.in_flight.clear()
        scheduler.in_flight.clear()
