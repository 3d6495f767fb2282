import pytest
from hypothesis import given, settings, strategies as st

from trtllm.runtime.block_manager import BlockManager
from trtllm.runtime.sequence import Sequence
from trtllm.sampling_params import SamplingParams


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=8))


def compute(bm, s, upto=None):
    """What the model does: compute tokens up to `upto` (all by default), then publish."""
    s.num_computed_tokens = s.num_tokens if upto is None else upto
    bm.publish(s)


def books(bm):
    return bm.num_free_blocks, bm.num_cached_blocks, bm.num_used_blocks


def test_allocate_free_books():
    bm = BlockManager(8, 4)
    a = seq(range(10))
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 3 and a.num_computed_tokens == 0 and a.num_cached_tokens == 0
    assert books(bm) == (5, 0, 3)
    compute(bm, a)
    bm.free(a)
    assert a.block_table == []
    assert books(bm) == (6, 2, 0)  # the two full blocks stay cached, the partial one is free
    bm.check_invariants([])


def test_prefix_reuse_across_two_requests():
    bm = BlockManager(8, 4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    bm.allocate(a)
    compute(bm, a)
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 99, 98, 97], rid="b")  # shares two full blocks
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == b.num_computed_tokens == 8
    bm.check_invariants([a, b])  # the shared blocks have ref count 2
    assert bm.prefix_queried_tokens == 21 and bm.prefix_hit_tokens == 8
    assert bm.prefix_hit_rate == pytest.approx(8 / 21)
    bm.free(a)
    bm.free(b)
    bm.check_invariants([])
    assert bm.num_used_blocks == 0


def test_cached_tokens_are_the_first_admissions_after_a_preemption():
    # re-admitted after preemption, a sequence finds the blocks it computed itself (its outputs' too):
    # num_cached_tokens took them, so the server's usage said cached_tokens 8 of a 3-token prompt
    bm = BlockManager(8, 4)
    a = seq([1, 2, 3])
    bm.allocate(a)
    compute(bm, a)
    assert bm.try_append(a, 6)
    a.output_token_ids += [4, 5, 6, 7, 8, 9]
    compute(bm, a)
    bm.free(a)  # preempted by recompute: its full blocks published
    a.num_computed_tokens = 0
    bm.allocate(a)
    assert a.num_computed_tokens == 8 and a.num_cached_tokens == 0
    assert bm.prefix_hit_tokens == 8  # the cache's own books count every hit
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 10], rid="b")  # a prefix a client's request shares
    bm.allocate(b)
    assert b.num_cached_tokens == 8
    bm.free(a)
    bm.free(b)
    bm.check_invariants([])


def test_chain_hash_names_the_whole_prefix():
    bm = BlockManager(8, 2)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    compute(bm, a)
    # same second block, different first block: no hit at all
    assert bm.num_prefix_hit_tokens(seq([9, 9, 3, 4, 5])) == 0
    assert bm.num_prefix_hit_tokens(seq([1, 2, 3, 4, 5])) == 4


@pytest.mark.parametrize("n, hit", [(8, 4), (9, 8), (5, 4), (4, 0)])
def test_never_a_hit_on_the_last_token(n, hit):
    bm = BlockManager(8, 4)
    a = seq(range(12))
    bm.allocate(a)
    compute(bm, a)
    b = seq(range(n), rid="b")
    bm.allocate(b)
    assert b.num_computed_tokens == hit and b.num_computed_tokens < b.num_tokens


def test_publish_only_full_computed_blocks():
    bm = BlockManager(8, 4)
    a = seq(range(10))
    bm.allocate(a)
    probe = seq(range(10), rid="probe")
    compute(bm, a, 3)
    assert bm.num_prefix_hit_tokens(probe) == 0  # block 0 not yet full of computed tokens
    compute(bm, a, 5)
    assert bm.num_prefix_hit_tokens(probe) == 4
    compute(bm, a, 8)
    assert bm.num_prefix_hit_tokens(probe) == 8
    a.num_computed_tokens = 9
    bm.free(a)  # the partial last block is never published
    assert books(bm) == (6, 2, 0)


def test_free_without_publish_keeps_cache_clean():
    bm = BlockManager(8, 4)
    a = seq(range(10))
    bm.allocate(a)
    compute(bm, a, 4)  # block 0 published during an earlier step
    a.num_computed_tokens = 10  # then this step's logits came out NaN
    bm.free(a, publish=False)
    assert books(bm) == (8, 0, 0)
    assert bm.num_prefix_hit_tokens(seq(range(10))) == 0
    bm.check_invariants([])


def test_same_prefix_computed_twice_is_published_once():
    bm = BlockManager(8, 4)
    a, b = seq(range(6)), seq(range(6), rid="b")
    bm.allocate(a)
    bm.allocate(b)  # nothing cached yet: both compute block 0
    compute(bm, a)
    compute(bm, b)
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    assert books(bm) == (7, 1, 0)  # b's duplicate went back to the free list
    bm.check_invariants([])


def test_lru_eviction_order():
    bm = BlockManager(6, 2)
    owners = {}
    for name, first in (("a", 10), ("b", 20), ("c", 30)):
        s = seq([first, first + 1, 0], rid=name)  # one full block (published) + one partial
        bm.allocate(s)
        compute(bm, s)
        owners[name] = s.block_table[0]
        bm.free(s)
    assert books(bm) == (3, 3, 0)
    touch = seq([10, 11, 5, 6, 7])  # a hit on a's block makes it the most recently used
    bm.allocate(touch)
    assert touch.block_table[0] == owners["a"]
    bm.free(touch)

    def hit(first):
        return bm.num_prefix_hit_tokens(seq([first, first + 1, 0]))

    big = seq([1] * 8)  # four blocks: the three free ones, then evict the oldest (b)
    bm.allocate(big)
    assert owners["b"] in big.block_table
    assert (hit(10), hit(20), hit(30)) == (2, 0, 2)
    assert bm.try_append(big, 0)  # no-op
    big.num_computed_tokens = 8
    assert bm.try_append(big, 1)  # decode needs a fifth block: evicts c next
    assert owners["c"] in big.block_table
    assert (hit(10), hit(20), hit(30)) == (2, 0, 0)
    bm.check_invariants([big])


def test_append_and_full_pool():
    bm = BlockManager(2, 2)
    s = seq([1, 2, 3])
    bm.allocate(s)
    s.num_computed_tokens = 3
    assert not bm.try_append(s, 2) and len(s.block_table) == 2  # refused: nothing changed
    assert bm.try_append(s, 1) and len(s.block_table) == 2  # the last block has room
    s.num_computed_tokens = 4
    assert not bm.try_append(s, 1) and len(s.block_table) == 2
    assert not bm.can_allocate(seq([5]))
    with pytest.raises(RuntimeError, match="can_allocate"):
        bm.allocate(seq([5]))
    bm.check_invariants([s])


def test_reuse_disabled():
    bm = BlockManager(4, 2, enable_block_reuse=False)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    compute(bm, a)
    bm.free(a)
    assert books(bm) == (4, 0, 0)
    b = seq([1, 2, 3, 4, 5])
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_check_invariants_catches_corruption():
    bm = BlockManager(4, 2)
    a = seq([1, 2, 3])
    bm.allocate(a)
    bm.check_invariants([a])
    with pytest.raises(AssertionError, match="ref counts differ"):
        bm.check_invariants([a, a])
    bm._ref[a.block_table[0]] = -1
    with pytest.raises(AssertionError, match="negative"):
        bm.check_invariants()


@pytest.mark.parametrize("corrupt, message", [
    (lambda bm, a: bm._free.append(bm._free[0]), "twice"),
    (lambda bm, a: bm._free.remove(bm._free[0]), "leaked"),
    (lambda bm, a: bm._free.append(a.block_table[0]), "referenced"),
    (lambda bm, a: setattr(bm, "_num_used", 0), "books say"),
    (lambda bm, a: bm._hash.__setitem__(bm._free[0], b"x"), "free block holds a published hash"),
    (lambda bm, a: bm._cached.__setitem__(bm._free[0], None), "both free and cached"),
    (lambda bm, a: bm._block_of_hash.__setitem__(b"y", a.block_table[1]), "hash table points"),
], ids=["free twice", "lost", "free but used", "used count", "free with hash", "free and cached", "hash table"])
def test_check_invariants_names_each_broken_book(corrupt, message):
    bm = BlockManager(8, 2)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    compute(bm, a)
    bm.check_invariants([a])
    corrupt(bm, a)
    with pytest.raises(AssertionError, match=message):
        bm.check_invariants()


def test_idle_check_is_full_on_a_small_pool_and_a_count_within_a_second_on_a_large_one():
    """check_when_idle (the engine's, each time it goes idle): a pool of <= FULL_IDLE_CHECK_BLOCKS
    gets the full check every time; a larger one the full check at most once a second and the
    O(1) count between, which still names a lost block."""
    from trtllm.runtime.block_manager import FULL_IDLE_CHECK_BLOCKS
    for num_blocks, full_each_time in ((FULL_IDLE_CHECK_BLOCKS, True), (FULL_IDLE_CHECK_BLOCKS + 1, False)):
        bm = BlockManager(num_blocks, 2)
        bm.check_when_idle()  # the first is always in full
        bm._hash[bm._free[0]] = b"x"  # a book only the full check reads
        if full_each_time:
            with pytest.raises(AssertionError, match="published hash"):
                bm.check_when_idle()
            continue
        bm.check_when_idle()  # within the second: the count, which balances
        lost = bm._free.pop()
        with pytest.raises(AssertionError, match="leaked"):
            bm.check_when_idle()
        bm._free.append(lost)
        bm._checked_at -= 1.0  # a second later: in full
        with pytest.raises(AssertionError, match="published hash"):
            bm.check_when_idle()


# --- property test: random allocate / compute / append / free -------------------------

kinds = ["alloc"] * 3 + ["compute"] * 3 + ["decode", "decode", "free", "fail"]
ops = st.lists(st.tuples(st.sampled_from(kinds), st.integers(0, 5), st.integers(1, 8)),
               min_size=20, max_size=80)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 16), block_size=st.sampled_from([1, 2, 3, 4]),
       reuse=st.sampled_from([True, True, True, False]))
def test_random_ops_keep_books_and_cache_content(ops, num_blocks, block_size, reuse):
    bm = BlockManager(num_blocks, block_size, reuse)
    kv = {}  # slot -> (position, token): what the "model" wrote into the cache
    prefixes = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5, 5, 5, 5, 5]]
    live = []

    def write(s, start, end):
        for p in range(start, end):
            kv[s.block_table[p // block_size] * block_size + p % block_size] = (p, s.token_ids[p])

    for op, i, n in ops:
        if op == "alloc":
            s = seq(prefixes[i % 3][: n] + [i] * (i % 2), rid=str(i))
            if bm.can_allocate(s):
                bm.allocate(s)
                live.append(s)
                assert s.num_computed_tokens < s.num_tokens  # the last token is computed
                # a prefix hit must hold exactly these tokens at these positions
                for p in range(s.num_computed_tokens):
                    slot = s.block_table[p // block_size] * block_size + p % block_size
                    assert kv[slot] == (p, s.token_ids[p])
        elif live:
            s = live[i % len(live)]
            if op == "compute":
                end = min(s.num_tokens, s.num_computed_tokens + n)
                write(s, s.num_computed_tokens, end)
                compute(bm, s, end)
            elif op == "decode" and s.num_computed_tokens == s.num_tokens:
                s.output_token_ids.append(n)
                if bm.try_append(s, 1):
                    write(s, s.num_computed_tokens, s.num_tokens)
                    compute(bm, s)
                else:
                    s.output_token_ids.pop()
            elif op in ("free", "fail"):
                bm.free(s, publish=op == "free")
                live.remove(s)
        bm.check_invariants(live)
        for s in live:
            assert len(s.block_table) * block_size >= max(s.num_computed_tokens, len(s.prompt_token_ids))
    for s in live:
        bm.free(s)
    bm.check_invariants([])
    assert bm.num_used_blocks == 0 and bm.num_free_blocks + bm.num_cached_blocks == num_blocks
