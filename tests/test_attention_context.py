"""AttentionMetadata.fill: the buffers describe exactly this step, however the rows'
block tables came and went (fill rewrites only the rows and entries that changed); the
active context, and the scratch one for whole sequences; PagedKVCache.copy_blocks."""
import random

import numpy as np
import pytest
import torch

from trtllm.attention_context import (
    AttentionMetadata,
    PagedKVCache,
    active_context,
    attention_context,
    in_attention_context,
    whole_sequences_context,
)

BS = 4


def expected(query_lens, seq_lens, tables, max_tokens, max_seqs):
    slots = [t[p // BS] * BS + p % BS for q, s, t in zip(query_lens, seq_lens, tables) for p in range(s - q, s)]
    starts = np.cumsum([0] + list(query_lens))
    return (slots + [-1] * (max_tokens - len(slots)), list(seq_lens) + [0] * (max_seqs - len(seq_lens)),
            list(starts) + [starts[-1]] * (max_seqs - len(query_lens)))


def check(meta, query_lens, seq_lens, tables):
    slots, lens, starts = expected(query_lens, seq_lens, tables, meta.max_num_tokens, meta.max_num_seqs)
    assert meta.slot_mapping.tolist() == slots
    assert meta.seq_lens.tolist() == lens
    assert meta.query_start_loc.tolist() == starts
    for i, t in enumerate(tables):  # entries past a table's length are never read
        assert meta.block_tables[i, : len(t)].tolist() == t
    assert (meta.num_seqs, meta.max_query_len, meta.max_seq_len) == (len(tables), max(query_lens), max(seq_lens))


def test_fill_follows_tables_that_grow_move_and_are_replaced():
    rng = random.Random(0)
    meta = AttentionMetadata(64, 6, 16, "cpu")

    def block():
        return rng.randrange(1000)

    seqs = []  # [block table, tokens in it]; the table grows in place, as the BlockManager's
    for _ in range(500):
        if len(seqs) < 6 and rng.random() < 0.3:  # admitted: a new list
            seqs.append([[], 0])
        if seqs and rng.random() < 0.1:  # finished: its list is dropped
            seqs.pop(rng.randrange(len(seqs)))
        if seqs and rng.random() < 0.1:  # preempted and re-admitted: a new list, other blocks
            seq = rng.choice(seqs)
            seq[0] = [block() for _ in seq[0]]
        if not seqs:
            continue
        rng.shuffle(seqs)  # rows move between steps
        for seq in seqs:
            if seq[1] + 9 > 16 * BS:  # full: start over in a new list
                seq[:] = [[], 0]
        query_lens = [rng.choice([1, 1, 1, rng.randint(2, 9)]) for _ in seqs]
        for seq, q in zip(seqs, query_lens):
            seq[1] += q
            while len(seq[0]) * BS < seq[1]:
                seq[0].append(block())
        seq_lens, tables = [seq[1] for seq in seqs], [seq[0] for seq in seqs]
        meta.fill(query_lens, seq_lens, tables, BS)
        check(meta, query_lens, seq_lens, [list(t) for t in tables])


def test_fill_after_a_bigger_step_clears_the_extra_slots():
    meta = AttentionMetadata(32, 4, 8, "cpu")
    meta.fill([9, 3], [9, 3], [[5, 6, 7], [2]], BS)
    check(meta, [9, 3], [9, 3], [[5, 6, 7], [2]])
    meta.fill([1], [10], [[5, 6, 7]], BS)
    check(meta, [1], [10], [[5, 6, 7]])
    assert torch.equal(meta.slot_mapping[1:], torch.full((31,), -1, dtype=torch.int32))


def test_the_active_context_is_the_innermost_one_and_none_outside():
    cache = PagedKVCache.allocate(1, 2, BS, 1, 8, torch.float32, "cpu")
    outer, inner = AttentionMetadata(4, 1, 2, "cpu"), AttentionMetadata(4, 1, 2, "cpu")
    assert not in_attention_context()
    with attention_context(cache, outer):
        with attention_context(cache, inner):
            assert in_attention_context() and active_context().metadata is inner
        assert active_context().metadata is outer
    assert not in_attention_context()


def test_whole_sequences_get_blocks_of_their_own():
    with whole_sequences_context(2, 6, BS, 3, 2, 8, torch.float32, "cpu") as ctx:
        assert ctx.cache.k.shape == (3, 4, BS, 2, 8)  # 2 sequences x 2 blocks of 4
        check(ctx.metadata, [6, 6], [6, 6], [[0, 1], [2, 3]])
    assert not in_attention_context()


@pytest.mark.parametrize("dtype, heads, head_dim, values", [
    (torch.float32, 2, 8, True), (torch.bfloat16, 2, 7, True), (torch.float8_e4m3fn, 2, 3, True),
    (torch.int8, 1, 5, True), (torch.float8_e4m3fn, 1, 3, True),  # 20 and 12 bytes a row: not int64 words
    (torch.bfloat16, 1, 12, False),  # a latent cache: V is 0 wide
])
def test_copy_blocks_copies_every_layer_of_each_pair_and_nothing_else(dtype, heads, head_dim, values):
    # a block's row of one layer is BS x heads x head_dim elements: copied as int64 words where they divide
    cache = PagedKVCache.allocate(3, 9, BS, heads, head_dim, torch.float32, "cpu", values=values)
    g = torch.Generator().manual_seed(0)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    cache = PagedKVCache(cache.k.to(dtype), cache.v.to(dtype))
    before_k, before_v = cache.k.clone(), cache.v.clone()
    src, dst = torch.tensor([1, 4, 1]), torch.tensor([2, 7, 8])
    cache.copy_blocks([(s, d, BS) for s, d in zip(src.tolist(), dst.tolist())])
    expect_k, expect_v = before_k.clone(), before_v.clone()
    expect_k[:, dst], expect_v[:, dst] = before_k[:, src], before_v[:, src]
    assert torch.equal(cache.k.view(torch.uint8), expect_k.view(torch.uint8))
    assert torch.equal(cache.v.view(torch.uint8), expect_v.view(torch.uint8))
