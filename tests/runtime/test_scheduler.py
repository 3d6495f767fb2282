import functools

import pytest
from hypothesis import given, settings, strategies as st

from trtllm.runtime.block_manager import BlockManager
from trtllm.runtime.scheduler import Scheduler
from trtllm.runtime.sequence import Sequence, SequenceStatus
from trtllm.sampling_params import SamplingParams

VOCAB = 7


def next_token(context):
    """The fake model: the next token is a function of the whole context."""
    h = 0
    for t in context:
        h = (h * 31 + t + 1) % 1_000_003
    return h % VOCAB


def reference(prompt, max_tokens):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def seq(prompt, max_tokens=4, rid=None):
    return Sequence(rid or f"r{len(prompt)}", list(prompt), SamplingParams(max_tokens=max_tokens))


class FakeEngine:
    """The engine's loop over a fake paged model: each step writes (position, token) into
    the cache slots of the scheduled tokens, reads every sequence's context back through
    its block table (so a wrong table or a poisoned prefix hit shows), and samples."""

    def __init__(self, num_blocks=16, block_size=4, max_num_seqs=4, max_num_tokens=16,
                 max_model_len=64, chunked=True, reuse=True, no_evict=False):
        self.bm = BlockManager(num_blocks, block_size, reuse)
        self.sched = Scheduler(self.bm, max_num_seqs, max_num_tokens, max_model_len, chunked, no_evict=no_evict)
        self.kv = {}
        self.written = {}  # sequence -> the cache slots its chunk wrote this step
        self.admissions = []  # sequences in the order of their first admission
        self.finished = []

    def slot(self, s, p):
        bs = self.bm.block_size
        return s.block_table[p // bs] * bs + p % bs

    def step(self, between=lambda: None):
        sched = self.sched
        scheduled = sched.schedule()
        self.finished += sched.pop_finished()
        assert len(scheduled) <= sched.max_num_seqs
        assert sum(n for _, n in scheduled) <= sched.max_num_tokens
        assert len({id(s) for s, _ in scheduled}) == len(scheduled)
        self.admissions += [s for s, _ in scheduled if s not in self.admissions]
        sampled, self.written = {}, {}
        for s, n in scheduled:
            c = s.num_computed_tokens
            assert n >= 1 and c + n <= s.num_tokens and s.status is SequenceStatus.RUNNING
            assert sched.enable_chunked_prefill or c + n == s.num_tokens
            assert len(s.block_table) * self.bm.block_size >= c + n
            self.written[s] = [self.slot(s, p) for p in range(c, c + n)]
            for p in range(c, c + n):
                self.kv[self.slot(s, p)] = (p, s.token_ids[p])
            context = [self.kv.get(self.slot(s, p)) for p in range(c + n)]
            assert context == [(p, t) for p, t in enumerate(s.token_ids[:c + n])]
            if c + n == s.num_tokens:  # the chunk reaches its last token: the step samples
                sampled[s] = next_token([t for _, t in context])
        between()  # where the engine may abort or fail sequences mid-step
        for s in sched.update(scheduled, sampled):
            if len(s.output_token_ids) >= s.sampling_params.max_tokens:
                sched.finish(s, "length")
                self.finished.append(s)
        self.check()
        return scheduled

    def poison(self, s):
        """What a step that produced NaN logits for `s` leaves in the cache."""
        for slot in self.written.get(s, []):
            self.kv[slot] = "NaN"

    def check(self):
        self.bm.check_invariants(self.sched.running)
        waiting = list(self.sched.waiting)
        assert all(not s.block_table and s.num_computed_tokens == 0 and s.status is SequenceStatus.WAITING
                   for s in waiting)
        # preempted sequences (admitted before) wait ahead of those never admitted
        seen = [s in self.admissions for s in waiting]
        assert seen == sorted(seen, reverse=True)
        for s in self.sched.running:
            assert len(s.block_table) * self.bm.block_size >= s.num_computed_tokens

    def run(self, max_steps=1000):
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                break
            self.step()
        assert not self.sched.has_unfinished(), "no progress"
        assert self.bm.num_used_blocks == 0
        assert self.bm.num_free_blocks + self.bm.num_cached_blocks == self.bm.num_blocks


def plan(scheduled):
    return [(s.request_id, n) for s, n in scheduled]


def test_chunked_prefill_splits_a_long_prompt():
    e = FakeEngine(max_num_tokens=4)
    a = seq(range(10), max_tokens=2, rid="a")
    e.sched.add(a)
    assert [plan(e.step()) for _ in range(5)] == [[("a", 4)], [("a", 4)], [("a", 2)], [("a", 1)], []]
    assert a.output_token_ids == reference(range(10), 2) and a.finish_reason == "length"


def test_decode_first_then_prefill_chunks_under_the_budget():
    e = FakeEngine(max_num_tokens=4)
    e.sched.add(seq([1, 2, 3], rid="a"))
    e.step()
    e.sched.add(seq(range(10), rid="b"))
    assert plan(e.step()) == [("a", 1), ("b", 3)]
    assert plan(e.step()) == [("a", 1), ("b", 3)]
    assert plan(e.step()) == [("a", 1), ("b", 3)]  # a finishes (max_tokens 4)
    assert plan(e.step()) == [("b", 1)]


def test_chunking_off_computes_a_prompt_in_one_step():
    e = FakeEngine(max_num_tokens=8, chunked=False)
    e.sched.add(seq(range(5), rid="a"))
    e.sched.add(seq(range(5), rid="b"))
    assert plan(e.step()) == [("a", 5)]  # b's 5 do not fit in the 3 left
    assert plan(e.step()) == [("a", 1), ("b", 1)]  # b: 4 tokens found in the prefix cache
    with pytest.raises(ValueError, match="chunked prefill is off"):
        e.sched.add(seq(range(6), max_tokens=4))


def test_fcfs_no_overtaking():
    e = FakeEngine(num_blocks=4, block_size=4)
    e.sched.add(seq(range(10), rid="a"))  # 3 blocks
    e.step()
    b, c = seq(range(20, 28), rid="b"), seq([40, 41], rid="c")  # b needs 2 blocks, c 1
    e.sched.add(b)
    e.sched.add(c)
    assert plan(e.step()) == [("a", 1)]
    assert list(e.sched.waiting) == [b, c]  # c would fit, but b is ahead of it
    e.run()
    assert all(s.output_token_ids == reference(s.prompt_token_ids, 4) for s in e.finished)


def test_max_num_seqs():
    e = FakeEngine(max_num_seqs=2)
    for i in range(3):
        e.sched.add(seq([i, i], rid=str(i)))
    assert plan(e.step()) == [("0", 2), ("1", 2)] and e.sched.num_waiting == 1
    e.run()


@pytest.mark.parametrize("reuse", [True, False])
def test_preempt_the_newest_then_readmit_with_the_same_tokens(reuse):
    e = FakeEngine(num_blocks=4, block_size=2, max_num_tokens=8, reuse=reuse)
    a, b = seq([1, 2, 3], max_tokens=6, rid="a"), seq([4, 5, 6], max_tokens=6, rid="b")
    e.sched.add(a)
    e.sched.add(b)
    e.step()
    e.step()  # both now hold 2 blocks and 4 tokens; the next decode needs a third block
    assert plan(e.step()) == [("a", 1)]
    assert e.sched.num_preemptions == 1 and list(e.sched.waiting) == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.output_token_ids == reference(b.prompt_token_ids, 2)  # kept for recompute
    e.run()
    assert a.output_token_ids == reference(a.prompt_token_ids, 6)
    assert b.output_token_ids == reference(b.prompt_token_ids, 6)


def test_preemption_under_pressure_keeps_outputs():
    e = FakeEngine(num_blocks=6, block_size=2, max_num_seqs=4, max_num_tokens=6)
    seqs = [seq([i % 3, 1, 2, i], max_tokens=5, rid=str(i)) for i in range(8)]
    for s in seqs:
        e.sched.add(s)
    e.run()
    assert e.sched.num_preemptions > 0
    assert [s.output_token_ids for s in seqs] == [reference(s.prompt_token_ids, 5) for s in seqs]


@pytest.mark.parametrize("where", ["waiting", "running", "partial", "mid-step"])
def test_abort(where):
    e = FakeEngine(max_num_tokens=4, num_blocks=8)
    a, other = seq(range(10), rid="a"), seq([9], max_tokens=20, rid="o")
    e.sched.add(other)
    e.step()
    e.sched.add(a)
    if where == "running":
        for _ in range(5):
            e.step()
        assert a.num_computed_tokens >= 10 and a.output_token_ids
    elif where == "partial":
        e.step()
        assert 0 < a.num_computed_tokens < 10
    aborted = []
    if where == "mid-step":
        e.step(between=lambda: aborted.extend(e.sched.abort("a")))
    else:
        aborted = e.sched.abort("a")
    assert aborted == [a] and a.finish_reason == "abort" and a.is_finished and not a.block_table
    assert e.sched.abort("a") == [] and e.sched.abort("nope") == []
    e.check()
    e.sched.abort("o")
    assert not e.sched.has_unfinished() and e.bm.num_used_blocks == 0


def test_error_before_update_is_not_published():
    e = FakeEngine()
    a = seq(range(10), rid="a")
    e.sched.add(a)
    e.step(between=lambda: e.sched.finish(a, "error", "NaN logits"))
    assert a.finish_reason == "error" and a.error == "NaN logits" and a.output_token_ids == []
    assert e.bm.num_cached_blocks == 0 and e.bm.num_used_blocks == 0


def test_update_wants_a_token_for_every_sampling_sequence():
    e = FakeEngine()
    e.sched.add(seq([1, 2]))
    scheduled = e.sched.schedule()
    with pytest.raises(KeyError, match="no sampled token"):
        e.sched.update(scheduled, {})


def test_never_fits_is_refused_at_add():
    e = FakeEngine(num_blocks=2, block_size=4, max_model_len=16)
    with pytest.raises(ValueError, match="max_model_len"):
        e.sched.add(seq(range(10), max_tokens=7))
    with pytest.raises(ValueError, match="3 KV blocks but the pool has only 2"):
        e.sched.add(seq(range(9), max_tokens=1))
    with pytest.raises(ValueError, match="empty"):
        e.sched.add(seq([]))
    with pytest.raises(ValueError, match="max_num_tokens"):
        Scheduler(e.bm, max_num_seqs=8, max_num_tokens=4, max_model_len=16)
    assert not e.sched.has_unfinished()


def test_outgrowing_the_pool_alone_finishes_with_length():
    e = FakeEngine(num_blocks=2, block_size=4, max_model_len=100)
    a = seq(range(6), max_tokens=50)
    e.sched.add(a)
    e.run()
    assert e.finished == [a] and a.finish_reason == "length"
    assert a.output_token_ids == reference(range(6), 3)  # 8 tokens computed, the 9th sampled


def test_readmission_larger_than_the_pool_finishes_with_length():
    e = FakeEngine(num_blocks=2, block_size=2)
    a = seq([1, 2], max_tokens=8)
    a.output_token_ids = [3, 4, 5]  # as if preempted after three outputs
    e.sched.waiting.append(a)
    assert e.step() == [] and e.finished == [a] and a.finish_reason == "length"


# --- property test: random arrivals, steps, stops, failures and aborts ----------------

PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 0, 0, 0, 0], [6, 6, 6, 6, 6, 6, 6, 6, 6]]
FATES = ["run", "run", "run", "abort", "abort-mid-step", "stop", "error-mid-step"]
# (arrival step, prompt prefix, prompt length, max_tokens, fate, steps after arrival until the fate)
request = st.tuples(st.integers(0, 8), st.integers(0, 2), st.integers(1, 9), st.integers(1, 8),
                    st.sampled_from(FATES), st.integers(0, 8))


@settings(max_examples=300, deadline=None)
@given(requests=st.lists(request, min_size=1, max_size=10), pool_tokens=st.integers(6, 24),
       block_size=st.sampled_from([1, 2, 4]), max_num_seqs=st.integers(1, 5),
       extra_tokens=st.integers(0, 10), chunked=st.booleans(),
       reuse=st.sampled_from([True, True, False]), no_evict=st.booleans())
def test_random_workloads(requests, pool_tokens, block_size, max_num_seqs, extra_tokens, chunked, reuse, no_evict):
    num_blocks = -(-pool_tokens // block_size)
    e = FakeEngine(num_blocks, block_size, max_num_seqs, max_num_seqs + extra_tokens,
                   max_model_len=24, chunked=chunked, reuse=reuse, no_evict=no_evict)
    sched, fates = e.sched, {}

    def fire(t, mid_step):
        for s, (fate, due) in list(fates.items()):
            if s.is_finished or t < due or fate.endswith("mid-step") != mid_step:
                continue
            if fate.startswith("abort"):
                assert sched.abort(s.request_id) == [s]
            elif fate == "error-mid-step":
                e.poison(s)  # a later prefix hit on these slots would fail the context check
                sched.finish(s, "error", "NaN")
            elif fate == "stop" and s.status is SequenceStatus.RUNNING:
                sched.finish(s, "stop")

    for t in range(1000):
        for i, (arrival, p, n, max_tokens, fate, after) in enumerate(requests):
            if arrival == t:
                s = seq(PREFIXES[p][:n], max_tokens, rid=f"r{i}")
                try:
                    sched.add(s)
                    fates[s] = (fate, t + after)
                except ValueError:
                    assert n + max_tokens > 24 or -(-n // block_size) > num_blocks or not chunked \
                        or (no_evict and -(-(n + max_tokens) // block_size) > num_blocks)
        if t > 8 and not sched.has_unfinished():
            break
        fire(t, mid_step=False)
        e.check()
        before = list(sched.waiting)
        e.step(between=functools.partial(fire, t, mid_step=True))
        # FCFS: the sequences admitted from the queue are a prefix of it
        admitted = [s.status is SequenceStatus.RUNNING for s in before if not s.is_finished]
        assert admitted == sorted(admitted, reverse=True)
    # and first admissions follow arrival order
    arrival = list(fates)
    assert e.admissions == sorted(e.admissions, key=arrival.index)
    assert not sched.has_unfinished(), "no progress"
    assert not no_evict or sched.num_preemptions == 0  # GUARANTEED_NO_EVICT: admission left room for all
    assert e.bm.num_used_blocks == 0 and e.bm.num_free_blocks + e.bm.num_cached_blocks == num_blocks
    assert not e.bm._chain and not e.bm._num_published  # no per-sequence state left behind
    for s in fates:
        assert s.is_finished
        assert s.output_token_ids == reference(s.prompt_token_ids, len(s.output_token_ids))
        assert len(s.output_token_ids) <= s.sampling_params.max_tokens


class OneSlotAdapters:
    """Adapters' admission contract (runtime/adapters.py) with one GPU slot: an adapter
    holds the slot while a running sequence uses it."""

    def __init__(self):
        self.pins: dict[str, int] = {}

    def can_admit(self, s):
        name = s.request_id[0]
        return name == "x" or not self.pins or name in self.pins

    def acquire(self, s):
        if s.request_id[0] != "x":
            assert self.can_admit(s)
            self.pins[s.request_id[0]] = self.pins.get(s.request_id[0], 0) + 1

    def none_admissible(self, seqs):
        return not any(self.can_admit(s) for s in seqs)

    def slot(self, s):
        return {"x": -1, "a": 0, "b": 1}.get(s.request_id[0], 2)

    def release(self, s):
        name = s.request_id[0]
        if name in self.pins:
            self.pins[name] -= 1
            if not self.pins[name]:
                del self.pins[name]


def test_lora_requests_of_a_resident_adapter_pass_one_that_waits_for_a_slot():
    """The front sequence's adapter has no slot: later ones whose adapter has one (or that
    have none: "x") are admitted meanwhile; after MAX_FRONT_SKIPS steps no one passes it."""
    import trtllm.runtime.scheduler as scheduler_module

    bm = BlockManager(64, 4, True)
    sched = Scheduler(bm, 8, 64, 64, adapters=OneSlotAdapters())
    a1, b1, a2, x1 = (Sequence(rid, [1, 2, 3], SamplingParams(max_tokens=4)) for rid in ("a1", "b1", "a2", "x1"))
    for s in (a1, b1, a2, x1):
        sched.add(s)
    assert [s for s, _ in sched.schedule()] == [a1, a2, x1]  # b1 waits for the slot a holds
    assert list(sched.waiting) == [b1]
    for _ in range(scheduler_module.MAX_FRONT_SKIPS):
        sched.schedule()  # no token is sampled: a1, a2, x1 stay running, a keeps the slot
    a3 = Sequence("a3", [4, 5, 6], SamplingParams(max_tokens=4))
    sched.add(a3)
    sched.schedule()
    assert list(sched.waiting) == [b1, a3]  # b1 has waited long enough: FCFS again


def test_lora_lets_the_overlap_scheduler_plan_ahead_while_every_waiting_adapter_lacks_a_slot():
    """b1 waits for the slot a1's adapter holds, with room in the batch: schedule would admit
    no one, so the decode step after a1's may be planned ahead (it was not: half of bench_lora's
    256 x 64 decode steps lost the overlap). Not when a1 ends at the step (its slot frees), nor
    while a sequence without an adapter waits (it can be admitted)."""
    bm = BlockManager(64, 4, True)
    sched = Scheduler(bm, 8, 64, 64, adapters=OneSlotAdapters())
    a1, b1 = (Sequence(rid, [1, 2, 3], SamplingParams(max_tokens=8)) for rid in ("a1", "b1"))
    sched.add(a1)
    sched.add(b1)
    first = sched.schedule()
    assert first == [(a1, 3)] and list(sched.waiting) == [b1]
    sched.update(first, {a1: 7})
    scheduled = sched.schedule()
    assert scheduled == [(a1, 1)]
    assert sched.schedule_ahead(scheduled, ends=lambda s: False) == ([a1], [0])
    assert sched.schedule_ahead(scheduled, ends=lambda s: True) is None  # a1 ends: b1 may take the slot
    x1 = Sequence("x1", [4, 5, 6], SamplingParams(max_tokens=8))
    sched.add(x1)
    assert sched.schedule_ahead(scheduled, ends=lambda s: False) is None  # x1 needs no slot: schedule admits it


def test_lora_decodes_are_grouped_by_adapter_slot():
    """A step's decodes come grouped by adapter slot, in arrival order within a slot (the LoRA
    kernels' token blocks then meet few adapters), prefill chunks after them."""
    bm = BlockManager(64, 4, True)
    adapters = OneSlotAdapters()
    adapters.can_admit = lambda s: True  # every adapter has a slot here
    sched = Scheduler(bm, 8, 64, 64, adapters=adapters)
    seqs = [Sequence(rid, [1, 2, 3], SamplingParams(max_tokens=4)) for rid in ("a1", "x1", "b1", "a2", "x2", "b2")]
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    assert [n for _, n in first] == [3] * 6  # prefills, in arrival order
    sched.update(first, {s: 7 for s, _ in first})
    order = [s.request_id for s, _ in sched.schedule()]
    assert order == ["x1", "x2", "a1", "a2", "b1", "b2"]


def test_guaranteed_no_evict_admits_what_can_finish_and_never_preempts():
    """Two prompts of 4 tokens, 12 new tokens each, a pool of 6 blocks of 4: MAX_UTILIZATION
    admits both and preempts one when the pool runs out; GUARANTEED_NO_EVICT admits the second
    only once the first finished (each needs 4 blocks through its max_tokens); same tokens."""
    outs = {}
    for no_evict in (False, True):
        e = FakeEngine(num_blocks=6, block_size=4, max_num_seqs=4, no_evict=no_evict)
        a, b = seq([1, 2, 3, 4], 12, rid="a"), seq([5, 6, 0, 1], 12, rid="b")
        e.sched.add(a)
        e.sched.add(b)
        e.step()
        assert [s.request_id for s in e.admissions] == (["a"] if no_evict else ["a", "b"])
        while e.sched.has_unfinished():
            e.step()
        outs[no_evict] = (a.output_token_ids, b.output_token_ids, e.sched.num_preemptions)
    assert outs[True][:2] == outs[False][:2] == (reference([1, 2, 3, 4], 12), reference([5, 6, 0, 1], 12))
    assert outs[False][2] > 0 and outs[True][2] == 0
    with pytest.raises(ValueError, match="GUARANTEED_NO_EVICT"):  # 4 + 30 tokens: 9 blocks through max_tokens
        FakeEngine(num_blocks=6, block_size=4, no_evict=True).sched.add(seq([1, 2, 3, 4], 30))


@pytest.mark.parametrize("no_evict", [True, False])
def test_the_overlap_scheduler_plans_ahead_while_the_pool_cannot_hold_the_front_one(no_evict):
    """b waits on the pool with a seat free: GUARANTEED_NO_EVICT, a pool of 6 blocks of 4 (b's
    reserve does not fit beside a's); MAX_UTILIZATION, a pool of 3 (a's 8-token prompt takes 2,
    b's needs 2). schedule would admit no one, so the decode step after a's may be planned
    ahead (under MAX_UTILIZATION it was not: every step lost its overlap while the pool was
    full); when a ends at the step, schedule plans it (b may be admitted)."""
    if no_evict:
        e = FakeEngine(num_blocks=6, block_size=4, max_num_seqs=4, no_evict=True)
        a, b = seq([1, 2, 3, 4], 12, rid="a"), seq([5, 6, 0, 1], 12, rid="b")
    else:
        e = FakeEngine(num_blocks=3, block_size=4, max_num_seqs=4)
        a, b = seq([1, 2, 3, 4, 5, 6, 0, 1], 4, rid="a"), seq([2, 3, 4, 5, 6, 0, 1, 2], 4, rid="b")
    e.sched.add(a)
    e.sched.add(b)
    for _ in range(3 if no_evict else 1):
        e.step()
    assert a.status is SequenceStatus.RUNNING and list(e.sched.waiting) == [b]
    scheduled = e.sched.schedule()
    assert scheduled == [(a, 1)]
    assert e.sched.schedule_ahead(scheduled, ends=lambda s: True) is None  # a ends: b may be admitted next
    assert e.sched.schedule_ahead(scheduled, ends=lambda s: False) == ([a], [0])
