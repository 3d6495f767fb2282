"""`Admission`: the `Scheduler`'s (runtime/scheduler.py) decisions about its waiting queue:
which waiting sequence is considered next, whether the pool can take its blocks now, and
whether anyone waiting could be admitted at all before a running sequence finishes.

- FCFS: the front of the queue is considered next. With LoRA (`adapters`, runtime/adapters.py),
  while the front sequence's adapter cannot have a GPU slot, later sequences whose adapters have
  one (or that have none) are considered past it, for MAX_FRONT_SKIPS steps at most
  (`next_waiting`).
- GUARANTEED_NO_EVICT (SchedulerConfig; `no_evict`): a sequence fits only while the pool also
  keeps the blocks every running sequence, and it, may still take until max_tokens (`reserve`):
  decoding then never runs out of blocks, and nothing is preempted.
- `waits`: no waiting sequence can be admitted before a running one finishes, so the overlap
  scheduler may plan the next decode step ahead (`Scheduler.schedule_ahead`).

The scheduler owns one `Admission` and passes it its queue and running list; the admitting
itself (blocks allocated, adapter slots pinned, the sequence moved to running) is the
scheduler's.
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable

from trtllm.runtime.block_manager import BlockManager
from trtllm.runtime.sequence import Sequence

# With LoRA, steps a waiting sequence whose adapter has no GPU slot lets later ones (whose
# adapters have) pass it, before admission waits for it (Admission.next_waiting).
MAX_FRONT_SKIPS = 256


class Admission:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_model_len: int,
                 adapters=None, no_evict: bool = False):
        self.block_manager = block_manager
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.adapters = adapters  # runtime/adapters.Adapters with LoRA, else None
        self.no_evict = no_evict  # GUARANTEED_NO_EVICT: admission keeps every running sequence's growth free
        self._num_steps = 0  # Scheduler.schedule() calls so far (new_step)
        self._front_blocked: tuple[Sequence, int] | None = None  # (the front sequence, the step it was first passed over)

    def new_step(self) -> None:
        """A `Scheduler.schedule` call begins (the front one is passed over for a number of them)."""
        self._num_steps += 1

    def fits(self, seq: Sequence, running: Iterable[Sequence]) -> bool:
        """The pool can take `seq`'s blocks now (under GUARANTEED_NO_EVICT, and still keep the
        reserve for it and the `running` sequences)."""
        return self.block_manager.can_allocate(seq, self.reserve(seq, running) if self.no_evict else 0)

    def waits(self, waiting: deque[Sequence], running: Iterable[Sequence]) -> bool:
        """No waiting sequence can be admitted before a running one finishes, so the overlap
        scheduler may plan the next decode step ahead meanwhile. With LoRA: every GPU slot is
        pinned by running sequences' adapters, and no waiting sequence that next_waiting
        looks at has its adapter in one (or none). 256 requests over 64 adapters in 32 slots
        ran half their decode steps without the overlap while the second half waited
        (bench/probes/lora_step.py --many, H100, 2026-12-07: 63 of 125 steps, 12.6 ms against
        11.0 launched ahead). Else: the pool cannot hold the front one's blocks (under
        GUARANTEED_NO_EVICT, with everyone's reserve) and, with fewer sequences running than
        max_num_seqs, a full pool would otherwise cost every step its overlap until one ends."""
        if self.adapters is not None:  # admission may pass the front one (next_waiting)
            return self.adapters.none_admissible(itertools.islice(waiting, self.max_num_seqs + 1))
        return not self.fits(waiting[0], running)

    def reserve(self, seq: Sequence, running: Iterable[Sequence]) -> int:
        """GUARANTEED_NO_EVICT: the blocks to keep free beside `seq`'s own now, for the `running`
        sequences (none for a sequence being added) and `seq` to grow to max_tokens (a beam
        group's other beams: a whole table each, their shared prompt blocks counted again: an
        upper bound)."""
        bm = self.block_manager

        def final(s: Sequence) -> int:
            return bm.blocks_needed(min(len(s.prompt_token_ids) + s.sampling_params.max_tokens, self.max_model_len))
        growth = sum(max(0, final(s) - len(s.block_table)) for s in running)
        width = seq.beam.width if seq.beam is not None else 1
        return growth + final(seq) - bm.blocks_needed(seq.num_tokens) + (width - 1) * final(seq)

    def next_waiting(self, waiting: deque[Sequence]) -> Sequence:
        """The waiting sequence admission considers next: the front one; with LoRA, when no
        GPU slot can be had for the front one's adapter, the first of the next max_num_seqs
        whose adapter has one (or that has none), so that requests of the adapters in slots
        fill the batch meanwhile (strict FCFS ran 8 sequences at a time for 256 requests
        over 64 adapters in 8 slots: 0.055x the base model's tok/s on the H200, 2026-12-03).
        The front one is passed over for MAX_FRONT_SKIPS steps at most; then admission waits
        for it (the slots' sequences finish, and one frees for it)."""
        front = waiting[0]
        if self.adapters is None or self.adapters.can_admit(front):
            self._front_blocked = None
            return front
        if self._front_blocked is None or self._front_blocked[0] is not front:
            self._front_blocked = (front, self._num_steps)
        if self._num_steps - self._front_blocked[1] >= MAX_FRONT_SKIPS:
            return front
        for i, seq in enumerate(waiting):
            if i > self.max_num_seqs:
                break
            if seq.beam is None and self.adapters.can_admit(seq):
                return seq
        return front
