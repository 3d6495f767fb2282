"""`Scheduler`: in-flight batching over a `BlockManager`.

Sequences wait in a FCFS queue, then run. Each `schedule()` builds one step: a list of
(sequence, number of new tokens it computes), in this order and under two budgets,
`max_num_tokens` tokens and `max_num_seqs` sequences:
1. decode: every running sequence with one token left to compute (its last sampled
   token) gets 1 token. If no block is left for it, the most recently admitted running
   sequence not yet scheduled this step is preempted by recompute (blocks freed, back
   to the *front* of the queue with num_computed_tokens = 0; its outputs are kept and
   recomputed with the prompt on re-admission, so they do not change);
2. prefill: running sequences partway through their prompt get their next chunk;
3. admission: waiting sequences, front first, get blocks for all their tokens (less
   any prefix-cache hit) and a first chunk. A waiting sequence is admitted only if all
   ahead of it were; none is admitted in a step that preempted. Under `no_evict`
   (SchedulerConfig's GUARANTEED_NO_EVICT) a sequence is admitted only while the pool also
   keeps the blocks every running sequence, and it, may still take until max_tokens:
   decoding then never runs out of blocks, and nothing is preempted. Which waiting
   sequence is considered next, and whether it fits: `Admission` (runtime/admission.py).
With chunked prefill off, a sequence's tokens are computed in one step or not at all.
Speculative decoding (runtime/speculative): a decoding sequence with k draft tokens
(`seq.draft_token_ids`) gets 1 + k tokens when the token budget and the pool still leave a
token and a block for each later sequence (drafts never cause a preemption); else its
drafts are dropped.
`update` then takes its accepted drafts and new token as a list, advances
num_computed_tokens past the accepted drafts only, and trims the rejected drafts' blocks.

Beam search (runtime/beams.py): only a group's leader waits; it is admitted with slots for
all its beams, which run parked (nothing to compute, skipped) until its first token. A
group is preempted whole (its victims never come from its own beams; a group that alone
fills the pool finishes "length"), and starts again from its prompt. `update` gives a beam
no token: its group's step does, after it.
With LoRA (`adapters`, runtime/adapters.py), a sequence is admitted only when its adapter has a
GPU slot or one can be freed for it; admission pins the slot, finishing or preemption unpins
it. While the front sequence's adapter cannot have a slot, later sequences whose adapters
have one are admitted past it, for MAX_FRONT_SKIPS steps at most (`Admission.next_waiting`). An adapter whose files cannot be read at admission fails its
sequence alone ("error", from pop_finished).

Pipeline parallelism (trtllm/parallel, the engine's micro-batches): `in_flight` holds the
sequences of micro-batches launched and not yet `update`d; `schedule` neither schedules them
again nor preempts them, and `schedule(max_seqs=k)` puts at most k sequences in a step.

A sequence's uncomputed tokens are `token_ids[num_computed_tokens:]`; a step computes
the next n of them, at positions num_computed_tokens .. num_computed_tokens + n - 1, and
its context is num_computed_tokens + n tokens in `block_table`. A step samples for a
sequence when its chunk reaches its last token (num_computed_tokens + n == num_tokens).

The engine's loop, and who does what:

    scheduled = scheduler.schedule()
    for seq in scheduler.pop_finished(): ...      # finished here ("length": pool too small)
    logits = run the model on `scheduled`
    sampled = {seq: token for seq, n in scheduled if the chunk reaches seq's last token}
    # a sequence whose logits are bad: scheduler.finish(seq, "error") *before* update,
    # so its blocks are never published
    for seq in scheduler.update(scheduled, sampled):   # the ones that got a token
        if stop condition: scheduler.finish(seq, "stop" | "length")

`update` advances num_computed_tokens, appends sampled tokens, and publishes newly full
blocks to the prefix cache; it skips sequences finished or aborted since `schedule`.
Stop conditions (EOS, stop strings, max_tokens) are the engine's.

`schedule_ahead` plans the step after a decode step *before* that step's `update`
(the engine's overlap scheduler launches it while the GPU still runs the first): the
same sequences, one token each at the position their pending token will take. It only
plans what `schedule` would plan itself: none while someone waiting could be admitted
(a free slot under max_num_seqs and room in the pool for its blocks, under
GUARANTEED_NO_EVICT with its reserve; with LoRA, a GPU slot for its adapter) or a block is short (admission and preemption stay `schedule`'s). A sequence that stops at that step by EOS or a stop string frees its slot
one step late.
"""
from __future__ import annotations

from collections import deque

from trtllm.runtime.admission import MAX_FRONT_SKIPS, Admission  # noqa: F401 (MAX_FRONT_SKIPS: its home was here)
from trtllm.runtime.block_manager import BlockManager
from trtllm.runtime.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_tokens: int,
                 max_model_len: int, enable_chunked_prefill: bool = True, adapters=None, no_evict: bool = False):
        if min(max_num_seqs, max_num_tokens, max_model_len) <= 0:
            raise ValueError("max_num_seqs, max_num_tokens and max_model_len must be > 0")
        if max_num_tokens < max_num_seqs:  # else some decodes could be left out of a step
            raise ValueError(f"max_num_tokens ({max_num_tokens}) must be >= max_num_seqs ({max_num_seqs})")
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_tokens = max_num_seqs, max_num_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in admission order
        self._finished: list[Sequence] = []  # finished by the scheduler, for pop_finished
        self.num_preemptions = 0
        self.adapters = adapters  # runtime/adapters.Adapters with LoRA, else None
        self.no_evict = no_evict  # GUARANTEED_NO_EVICT: admission keeps every running sequence's growth free
        # pipeline parallelism: sequences of micro-batches launched and not yet `update`d, which
        # `schedule` leaves alone (neither scheduled again nor preempted); the engine keeps it
        self.in_flight: set[Sequence] = set()
        self.admission = Admission(block_manager, max_num_seqs, max_model_len, adapters, no_evict)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; ValueError if it could never run."""
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"sequence {seq.seq_id} is not a fresh waiting sequence")
        if seq.num_tokens == 0:
            raise ValueError("the prompt is empty")
        max_tokens = seq.sampling_params.max_tokens
        if seq.num_tokens + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({seq.num_tokens} tokens) + max_tokens ({max_tokens}) "
                             f"exceeds max_model_len ({self.max_model_len})")
        need, pool = self.block_manager.blocks_needed(seq.num_tokens), self.block_manager.num_blocks
        if need > pool:
            raise ValueError(f"the prompt needs {need} KV blocks but the pool has only {pool}")
        if self.no_evict and (whole := self.admission.reserve(seq, ()) + need) > pool:
            beams = f" x {seq.beam.width} beams" if seq.beam is not None else ""
            raise ValueError(f"prompt ({seq.num_tokens} tokens) + max_tokens ({max_tokens}){beams} needs {whole} KV "
                             f"blocks but the pool has only {pool} (GUARANTEED_NO_EVICT keeps them all for it)")
        # without chunking, a preempted sequence recomputes prompt and outputs in one step
        if not self.enable_chunked_prefill and seq.num_tokens + max_tokens - 1 > self.max_num_tokens:
            raise ValueError(f"prompt ({seq.num_tokens} tokens) + max_tokens ({max_tokens}) - 1 "
                             f"exceeds max_num_tokens ({self.max_num_tokens}) and chunked "
                             "prefill is off")
        self.waiting.append(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of `request_id`, waiting or running, with "abort"."""
        aborted = [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
        for seq in aborted:
            self.finish(seq, "abort")
        return aborted

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Finish `seq` and free its blocks; those of an "error" are not published."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq, publish=reason != "error")
        if self.adapters is not None:
            self.adapters.release(seq)
        seq.finish(reason, error)

    def pop_finished(self) -> list[Sequence]:
        """Sequences the scheduler finished itself since the last call: "length" for one
        that outgrew the whole KV pool."""
        finished, self._finished = self._finished, []
        return finished

    def schedule(self, max_seqs: int | None = None) -> list[tuple[Sequence, int]]:
        """One step; `max_seqs`: at most this many sequences in it (a pipeline's micro-batch)."""
        scheduled: list[tuple[Sequence, int]] = []
        limit = max_seqs or self.max_num_seqs
        self.admission.new_step()
        in_step: set[Sequence] = set()
        budget = self.max_num_tokens
        preempted = False

        running = list(self.running)
        for i, seq in enumerate(running):  # 1. decode, oldest first
            if seq.status is not SequenceStatus.RUNNING or seq.num_tokens - seq.num_computed_tokens != 1 \
                    or seq in self.in_flight or len(scheduled) >= limit:
                continue
            n = 1 + len(seq.draft_token_ids)  # speculative decoding: verify k drafts too
            if n > 1 and not self._room_for_drafts(seq, n, budget, len(running) - i - 1):
                seq.draft_token_ids, n = [], 1
            while not self.block_manager.try_append(seq, 1):
                preempted = True
                victims = [s for s in self.running if s is not seq and s not in in_step
                           and s not in self.in_flight and (s.beam is None or s.beam is not seq.beam)]
                if victims:
                    self._preempt(victims[-1])
                    continue
                group = seq.beam.beams if seq.beam is not None else [seq]  # a beam group goes whole
                budget += self._unschedule(group, scheduled, in_step)
                if len(self.running) == len(group):  # it alone fills the pool: it can never grow
                    for s in group:
                        self.finish(s, "length")
                        self._finished.append(s)
                else:  # only sequences already scheduled this step are left to hold blocks
                    self._preempt(seq)
                break
            else:  # try_append made room
                scheduled.append((seq, n))
                in_step.add(seq)
                budget -= n

        if self.adapters is not None and len(scheduled) > 1:
            # decodes grouped by adapter slot (stable: a beam group stays together): a LoRA
            # kernel's 16-token block then meets one or two adapters, where in arrival order
            # it met up to 16 and looped over each (kernels/lora_sgmv.py)
            scheduled.sort(key=lambda item: self.adapters.slot(item[0]))

        # 2. the next chunk of partly prefilled sequences (none when all running decode)
        for seq in self.running if len(in_step) < len(self.running) else ():
            if seq in in_step or budget == 0 or seq in self.in_flight or len(scheduled) >= limit:
                continue
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining == 0:  # a beam waiting for its group's next step (runtime/beams.py)
                continue
            if not self.enable_chunked_prefill and remaining > budget:
                continue
            chunk = min(remaining, budget)
            scheduled.append((seq, chunk))
            in_step.add(seq)
            budget -= chunk

        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs \
                and len(scheduled) < limit:
            seq = self.admission.next_waiting(self.waiting)  # 3. admission, FCFS (with LoRA: see next_waiting)
            if seq.beam is not None and len(self.running) + seq.beam.width > self.max_num_seqs:
                break  # a beam group's beams are admitted together (runtime/beams.py)
            if self.block_manager.blocks_needed(seq.num_tokens) > self.block_manager.num_blocks:
                self.finish(seq, "length")  # re-admitting its outputs would overflow the pool
                self._finished.append(seq)
                continue
            if not self.admission.fits(seq, self.running):
                break
            remaining = seq.num_tokens - self.block_manager.num_prefix_hit_tokens(seq)
            if not self.enable_chunked_prefill and remaining > budget:
                break
            if self.adapters is not None:
                if not self.adapters.can_admit(seq):
                    break  # every slot is pinned by a running sequence's adapter
                try:
                    self.adapters.acquire(seq)
                except ValueError as e:
                    self.finish(seq, "error", str(e))
                    self._finished.append(seq)
                    continue
            self.waiting.popleft() if seq is self.waiting[0] else self.waiting.remove(seq)
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.beam is not None:  # its other beams wait, holding slots, for its first token
                followers = seq.beam.park_followers()
                for follower in followers if self.adapters is not None else ():
                    self.adapters.acquire(follower)  # the leader's adapter, in its slot now: a pin each
                self.running += followers
            chunk = min(remaining, budget)
            scheduled.append((seq, chunk))
            budget -= chunk
        return scheduled

    def schedule_ahead(self, scheduled: list[tuple[Sequence, int]], ends) -> tuple[list[Sequence], list[int]] | None:
        """The decode step after `scheduled` (single-token decodes of every running
        sequence, not yet `update`d): its sequences and their rows in `scheduled`, less
        those `ends(seq)` says finish at `scheduled`. Their blocks then cover the position
        after the pending token. None when the next step is `schedule`'s to plan."""
        if self.waiting and len(self.running) < self.max_num_seqs \
                and not self.admission.waits(self.waiting, self.running):
            return None  # a slot is free for the next in line: see below
        seqs, rows, running = [], [], 0
        for row, (seq, n) in enumerate(scheduled):
            if seq.status is not SequenceStatus.RUNNING:  # finished or aborted since
                continue
            running += 1
            if n != 1:
                return None
            if ends(seq):
                continue
            # num_computed_tokens + 2: the pending token's slot and the next one's
            if not self.block_manager.try_append(seq, 2):
                return None  # a block is short: `schedule` decides whom to preempt
            seqs.append(seq)
            rows.append(row)
        if running != len(self.running):  # someone running is not in the step
            return None
        # Someone waits and may be admitted next step (a slot is free, or one frees by
        # length now): `schedule` plans it. A batch that stays full admits no one anyway, nor
        # does a pool that cannot hold the front one (with its reserve under GUARANTEED_NO_EVICT),
        # nor LoRA while every adapter slot is pinned, and no one ends.
        ended = running > len(seqs)
        if self.waiting and len(seqs) < self.max_num_seqs \
                and (ended or not self.admission.waits(self.waiting, self.running)):
            return None
        return (seqs, rows) if seqs else None

    def update(self, scheduled: list[tuple[Sequence, int]], sampled: dict[Sequence, int]) -> list[Sequence]:
        """Record a step the model ran. `sampled` holds the next token of every scheduled
        sequence whose chunk reached its last token at schedule time. Returns the
        sequences that got a token, for the engine's stop checks."""
        got_token = []
        publish = self.block_manager.publish
        for seq, n in scheduled:
            if seq.status is not SequenceStatus.RUNNING:  # finished or aborted meanwhile
                continue
            remaining = seq.num_tokens - seq.num_computed_tokens
            # the chunk reached its last token (n > remaining: and drafts; a beam's comes with its
            # group's: runtime/beams.py)
            if n >= remaining and seq.beam is None:
                token = sampled.get(seq)
                if token is None:
                    raise KeyError(f"no sampled token for sequence {seq.seq_id} "
                                   f"(request {seq.request_id}), whose chunk reached its last token")
                if isinstance(token, list):  # a verify step: accepted drafts, then the target's token
                    seq.output_token_ids += token
                    seq.num_computed_tokens += remaining + len(token) - 1
                    self.block_manager.trim(seq, seq.num_tokens)  # the rejected drafts' slots
                    got_token.append(seq)
                    publish(seq)
                    continue
                seq.output_token_ids.append(int(token))
                got_token.append(seq)
            seq.num_computed_tokens += n
            publish(seq)
        return got_token

    def _unschedule(self, seqs: list[Sequence], scheduled: list, in_step: set) -> int:
        """Take `seqs` out of the step being built; the tokens they gave back to the budget."""
        back = [(s, n) for s, n in scheduled if s in seqs]
        for item in back:
            scheduled.remove(item)
            in_step.discard(item[0])
        return sum(n for _, n in back)

    def _room_for_drafts(self, seq: Sequence, n: int, budget: int, later: int) -> bool:
        """Take the slots of `seq`'s n tokens (its last and its drafts) if the step's budget
        and the pool still leave a token and a block for each of the `later` sequences after
        it: drafts never cause a preemption."""
        bm = self.block_manager
        short = max(0, bm.blocks_needed(seq.num_computed_tokens + n) - len(seq.block_table))
        if budget - n < later or bm.num_free_blocks + bm.num_cached_blocks - short < later:
            return False
        return bm.try_append(seq, n)

    def _preempt(self, seq: Sequence) -> None:
        """Preempt by recompute. Freeing publishes its computed full blocks, so unless
        they are evicted meanwhile, re-admission finds them in the prefix cache. A beam
        group is preempted whole and starts again from its prompt (runtime/beams.py)."""
        for s in seq.beam.beams if seq.beam is not None else [seq]:
            if s in self.running:
                self.running.remove(s)
                self.block_manager.free(s)
                if self.adapters is not None:
                    self.adapters.release(s)
        if seq.beam is not None:
            seq = seq.beam.restart()
        seq.status, seq.num_computed_tokens = SequenceStatus.WAITING, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
