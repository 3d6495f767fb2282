"""How rank 0 hands each model call to the other ranks: a broadcast over the control group
(process_group.py), which works across nodes (torchrun) as on one. Rank 0 does not wait for
the others to take it (the broadcast is asynchronous on its side), so it runs its own stage of
the next micro-batch while later stages still run the last one.

    channel = StepChannel(groups.control, rank)
    channel.send(step)          # rank 0: any picklable object; None tells the workers to stop
    step = channel.recv()       # the others, in the order rank 0 sent
    sizes = channel.gather(n)   # every rank: rank 0 gets [its n, rank 1's, ...], the others None
"""
from __future__ import annotations

import pickle
from collections import deque

import torch
import torch.distributed as dist

# Sends rank 0 keeps in flight before it waits for the oldest (each holds its pickled step).
MAX_UNFINISHED_SENDS = 64


class StepChannel:
    def __init__(self, group, rank: int):
        self.group, self.rank = group, rank
        self._sends: deque = deque()

    def send(self, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        size = torch.tensor([len(data)], dtype=torch.long)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        works = [dist.broadcast(size, 0, group=self.group, async_op=True),
                 dist.broadcast(payload, 0, group=self.group, async_op=True)]
        self._sends.append((works, size, payload))  # the tensors live until their sends are done
        while self._sends and (len(self._sends) > MAX_UNFINISHED_SENDS
                               or all(w.is_completed() for w in self._sends[0][0])):
            for w in self._sends.popleft()[0]:
                w.wait()

    def flush(self) -> None:
        """Wait until every step sent has gone out (before the group is left)."""
        while self._sends:
            for w in self._sends.popleft()[0]:
                w.wait()

    def recv(self):
        size = torch.zeros(1, dtype=torch.long)
        dist.broadcast(size, 0, group=self.group)
        payload = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(payload, 0, group=self.group)
        return pickle.loads(payload.numpy().tobytes())

    def gather(self, obj) -> list | None:
        out = [None] * dist.get_world_size(self.group) if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out
