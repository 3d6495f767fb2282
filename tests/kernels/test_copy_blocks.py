import pytest
import torch

from trtllm.attention_context import PagedKVCache
from trtllm.kernels.copy_blocks import copy_blocks, copy_blocks_ref, copy_blocks_triton

# (layers, blocks, block_size, heads, head_dim, dtype): a row of 7 x 3 x 83 bf16 (3,486 bytes: not
# whole words, moved as bytes); rows of several 1,024-word chunks with a tail; FP8 and INT8 pools
POOLS = [
    (2, 9, 7, 3, 83, torch.bfloat16),
    (3, 12, 32, 2, 130, torch.bfloat16),
    (1, 9, 16, 4, 64, torch.float32),
    (2, 8, 16, 1, 769, torch.float8_e4m3fn),
    (2, 8, 5, 1, 7, torch.int8),
]


def random_pool(layers, blocks, block_size, heads, head_dim, dtype):
    shape = (layers, blocks, block_size, heads, head_dim)
    if dtype == torch.int8:
        return torch.randint(-128, 127, shape, dtype=torch.int8)
    return (torch.randn(shape) * 50).clamp(-400, 400).to(dtype)  # fresh, never zeros


def pairs(blocks, n, seed):
    perm = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed))
    return perm[:n].clone(), perm[n:2 * n].clone()  # sources; fresh destinations no pair reads


def expected(pool, src, dst, tokens):
    """The copies' tokens, plus whatever the words that hold the last one carry past it."""
    want = pool.clone()
    token_bytes = pool[0, 0, 0].nbytes
    word = 8 if pool[0, 0].nbytes % 8 == 0 else 1
    rows, old = want.view(*pool.shape[:2], -1).view(torch.uint8), pool.view(*pool.shape[:2], -1).view(torch.uint8)
    for s, d, n in zip(src.tolist(), dst.tolist(), tokens.tolist()):
        copied = -(-n * token_bytes // word) * word
        rows[:, d, :copied] = old[:, s, :copied]
    return want


@pytest.mark.parametrize("shape", POOLS, ids=lambda s: f"{s[-1]}-{s[3]}x{s[4]}")
def test_copies_the_held_tokens_of_every_layer_and_nothing_else(shape):
    pool = random_pool(*shape)
    block_size = shape[2]
    src, dst = pairs(shape[1], 4, seed=shape[4])
    tokens = torch.tensor([block_size, 1, block_size // 2 + 1, 0])  # whole, one, a part, none
    want = expected(pool, src, dst, tokens)
    assert torch.equal(want[:, dst[0]], pool[:, src[0]]) and torch.equal(want[:, dst[3]], pool[:, dst[3]])
    got = pool.clone()
    copy_blocks_triton(got, src, dst, tokens)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    ref = pool.clone()
    copy_blocks_ref(ref, src, dst, tokens)
    assert torch.equal(ref.view(torch.uint8), want.view(torch.uint8))


def test_no_pairs_and_the_cache_copies_both_pools():
    pool = random_pool(2, 6, 4, 2, 16, torch.bfloat16)
    before = pool.clone()
    none = torch.empty(0, dtype=torch.int64)
    copy_blocks(pool, none, none, none)
    assert torch.equal(pool, before)
    cache = PagedKVCache(random_pool(2, 6, 4, 2, 16, torch.bfloat16), random_pool(2, 6, 4, 2, 16, torch.bfloat16))
    k, v = cache.k.clone(), cache.v.clone()
    cache.copy_blocks([(1, 3, 4), (4, 0, 4)])
    for pool, old in ((cache.k, k), (cache.v, v)):
        assert torch.equal(pool[:, [3, 0]], old[:, [1, 4]]) and torch.equal(pool[:, [1, 2, 4, 5]], old[:, [1, 2, 4, 5]])


def test_refuses_other_index_dtypes_and_unpaired_lists_by_name():
    pool = random_pool(1, 4, 4, 1, 8, torch.bfloat16)
    with pytest.raises(AssertionError, match="src: torch.int32"):
        copy_blocks(pool, torch.tensor([0], dtype=torch.int32), torch.tensor([1]), torch.tensor([4]))
    with pytest.raises(AssertionError, match="one of each a pair"):
        copy_blocks(pool, torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([4, 4]))


def test_opcheck():
    pool = random_pool(2, 6, 4, 2, 16, torch.bfloat16)
    torch.library.opcheck(torch.ops.trtllm.copy_blocks.default,
                          (pool, torch.tensor([1, 2]), torch.tensor([4, 5]), torch.tensor([3, 4])))
