"""trtllm.lora_shrink / lora_expand (kernels/lora_sgmv.py) against their references, and the
references against the plain per-adapter formula: tokens of different adapters and of none in
one flat batch, adapters of different ranks padded to the slots' rank."""
import pytest
import torch

from trtllm.kernels.lora_sgmv import (
    lora_expand,
    lora_expand_partials,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_partials,
    lora_shrink_ref,
    shrink_splits,
)

TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _slots(t: int, num_slots: int, extra: int = 3) -> torch.Tensor:
    """Runs of one slot (as a flat batch lays sequences out), some -1, and a tail past t the
    ops must not read."""
    runs = torch.randint(-1, num_slots, (t,))
    lengths = torch.randint(1, 9, (t,))
    slots = torch.repeat_interleave(runs, lengths)[:t]
    return torch.cat([slots, torch.full((extra,), 10**6)])  # past t: would index out of bounds


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("t,k,n,rank", [(1, 7, 83, 8), (7, 83, 769, 16), (83, 769, 7, 32), (769, 83, 83, 48),
                                         (5, 769, 83, 16), (64, 600, 16, 48),  # these two split K
                                         (1030, 40, 150, 16)])  # prefill-sized: blocks of 64 tokens
def test_shrink_and_expand_match_their_references(t, k, n, rank, dtype):
    num_slots = 3
    x = torch.randn(t, k, dtype=dtype)
    a = (torch.randn(num_slots, rank, k) / k**0.5).to(dtype)
    b = torch.randn(num_slots, n, rank, dtype=dtype)
    base = torch.randn(t, n, dtype=dtype)
    slots = _slots(t, num_slots)
    h = lora_shrink(x, a, slots)
    assert h.shape == (t, rank) and h.dtype == dtype
    torch.testing.assert_close(h, lora_shrink_ref(x, a, slots), **TOLERANCES[dtype])
    h = lora_shrink_ref(x, a, slots)
    out = lora_expand(base, h, b, slots)
    assert out.shape == base.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, lora_expand_ref(base, h, b, slots), **TOLERANCES[dtype])
    no_adapter = slots[:t] < 0
    assert torch.equal(out[no_adapter], base[no_adapter])  # the base rows pass through untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16: test_lora_sgmv_gpu.py (the
@pytest.mark.parametrize("t,k", [(5, 769), (64, 4100), (17, 14336)])  # interpreter skips its roundings)
def test_split_sums_in_order_wherever_they_are_added(t, k, dtype, device="cpu"):
    """The shrink's partial sums over K splits (4, 17: past a power of 2, 56), added by the sum
    kernel (lora_shrink) or inside the expand (lora_expand_partials), give the same h bit for
    bit: each adds the splits in order, in fp32, and rounds once."""
    torch.manual_seed(0)
    x = torch.randn(t, k, dtype=dtype, device=device)
    a = (torch.randn(3, 16, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(3, 40, 16, dtype=dtype, device=device)
    base = torch.randn(t, 40, dtype=dtype, device=device)
    slots = _slots(t, 3).to(device)
    parts = lora_shrink_partials(x, a, slots)
    assert parts.shape[0] == shrink_splits(t, k, 128)[0] > 1
    h = lora_shrink(x, a, slots)
    in_order = parts[0].clone()
    for p in parts[1:]:
        in_order += p
    assert torch.equal(h, in_order.to(dtype))
    assert torch.equal(lora_expand_partials(base, parts, b, slots), lora_expand_partials(base, h[None], b, slots))


def test_decode_shapes_split_k():
    assert shrink_splits(5, 769, 128) == (4, 256)  # the last split holds one element
    assert shrink_splits(1, 4096, 128) == (16, 256) and shrink_splits(1, 14336, 128) == (56, 256)
    assert shrink_splits(1, 200, 128) == (1, 200)


@pytest.mark.parametrize("t", [65, 83, 128, 256, 769, 2048, 5125, 8192])
@pytest.mark.parametrize("k,r_blocks", [(4096, 1), (14336, 1), (769, 2)])
def test_more_tokens_split_k_only_as_far_as_the_grid_needs(t, k, r_blocks):
    """Past SPLIT_K_MAX_TOKENS: splits cover K in whole BLOCK_K steps, and there are about
    enough of them for SHRINK_PROGRAMS programs (or every SPLIT_K_CHUNK of K is one): at
    least half as many (the rounding to BLOCK_K), never one more than the grid needs."""
    from trtllm.kernels.lora_sgmv import SHRINK_PROGRAMS, SPLIT_K_CHUNK, token_block
    splits, per_split = shrink_splits(t, k, 128, r_blocks)
    assert per_split % 128 == 0 or splits == 1
    assert (splits - 1) * per_split < k <= splits * per_split
    programs = -(-t // token_block(t)) * r_blocks
    assert 2 * programs * splits >= SHRINK_PROGRAMS or splits == -(-k // SPLIT_K_CHUNK) or programs >= SHRINK_PROGRAMS
    if splits > 1:  # one split fewer would leave the grid short
        assert programs * (splits - 1) < SHRINK_PROGRAMS
    assert shrink_splits(128, 4096, 128) == (16, 256)  # bench_lora's 128-token steps: 8 blocks x 16 splits


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("t,sizes", [(7, (83, 7, 7)), (83, (64, 64)), (1030, (40, 23, 20)), (5, (769,))])
def test_expand_reads_only_each_parts_ranks(t, sizes, dtype):
    """A fused GEMM's block-diagonal B (q/k/v or gate/up parts, rank 16 each) with its parts
    given: the expand reads only each part's ranks, so B holding garbage off its blocks gives
    the output of the zeros there. Part boundaries off BLOCK_N (a tile meeting two parts), a
    gap of rows no part covers (the second layout leaves 5 of them), one part."""
    torch.manual_seed(t)
    rank, n = 16, sum(sizes) + (5 if len(sizes) == 2 else 0)
    starts = [sum(sizes[:i]) + (5 if i == 1 and len(sizes) == 2 else 0) for i in range(len(sizes))]
    parts = [v for start, size in zip(starts, sizes) for v in (start, size)]
    b = torch.randn(3, n, rank * len(sizes), dtype=dtype)
    on_blocks = torch.zeros_like(b, dtype=torch.bool)
    for i, (start, size) in enumerate(zip(starts, sizes)):
        on_blocks[:, start:start + size, i * rank:(i + 1) * rank] = True
    base, h = torch.randn(t, n, dtype=dtype), torch.randn(t, rank * len(sizes), dtype=dtype)
    slots = _slots(t, 3)
    want = lora_expand_ref(base, h, torch.where(on_blocks, b, 0), slots)
    out = lora_expand(base, h, b, slots, parts)  # off the blocks: garbage the kernel must not read
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])
    torch.testing.assert_close(lora_expand_ref(base, h, b, slots, parts), want, atol=1e-5, rtol=1e-5)
    if len(sizes) > 1:  # without parts the garbage is read: the test can tell
        assert not torch.allclose(lora_expand(base, h, b, slots), want, **TOLERANCES[dtype])


def test_references_are_the_per_adapter_formula_with_mixed_ranks():
    # three adapters of ranks 4, 8, 16 in slots of rank 16 (zero rows past each rank)
    t, k, n, max_rank = 12, 40, 24, 16
    x, base = torch.randn(t, k, dtype=torch.float32), torch.randn(t, n, dtype=torch.float32)
    a = torch.zeros(3, max_rank, k, dtype=torch.float32)
    b = torch.zeros(3, n, max_rank, dtype=torch.float32)
    adapters = []
    for s, r in enumerate((4, 8, 16)):
        a_s, b_s = torch.randn(r, k, dtype=torch.float32), torch.randn(n, r, dtype=torch.float32)
        a[s, :r], b[s, :, :r] = a_s, b_s
        adapters.append((a_s, b_s))
    slots = torch.tensor([0, 0, -1, 1, 1, 1, 2, -1, 2, 0, 1, 2])
    out = lora_expand_ref(base, lora_shrink_ref(x, a, slots), b, slots)
    for i, s in enumerate(slots.tolist()):
        want = base[i] if s < 0 else base[i] + x[i] @ adapters[s][0].T @ adapters[s][1].T
        torch.testing.assert_close(out[i], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leading_dims_and_strided_base(dtype):
    # [1, T, K] as the runtime's flat batch; base a slice of a fused GEMM's output
    x = torch.randn(1, 7, 83, dtype=dtype)
    a = (torch.randn(2, 16, 83) / 9).to(dtype)
    b = torch.randn(2, 769, 16, dtype=dtype)
    fused = torch.randn(1, 7, 2 * 769, dtype=dtype)
    base = fused[..., 769:]
    slots = torch.tensor([1, 1, 0, -1, 0, 1, -1])
    h = lora_shrink(x, a, slots)
    assert h.shape == (1, 7, 16)
    torch.testing.assert_close(h, lora_shrink_ref(x, a, slots), **TOLERANCES[dtype])
    out = lora_expand(base, h, b, slots)
    torch.testing.assert_close(out, lora_expand_ref(base, h, b, slots), **TOLERANCES[dtype])


def test_bad_shapes_are_refused():
    x, a, slots = torch.randn(5, 16), torch.randn(2, 8, 16), torch.zeros(5, dtype=torch.long)
    with pytest.raises(AssertionError, match="lora_a"):
        lora_shrink(x, torch.randn(2, 8, 17), slots)
    with pytest.raises(AssertionError, match="slot_ids"):
        lora_shrink(x, a, torch.zeros(4, dtype=torch.long))
    with pytest.raises(AssertionError, match="lora_b"):
        lora_expand(torch.randn(5, 9), torch.randn(5, 8), torch.randn(2, 10, 8), slots)


def test_opcheck():
    x, a = torch.randn(7, 83, dtype=torch.bfloat16), torch.randn(3, 16, 83, dtype=torch.bfloat16)
    slots = torch.tensor([0, 0, -1, 2, 2, 1, -1, 5])
    torch.library.opcheck(torch.ops.trtllm.lora_shrink.default, (x, a, slots))
    base, h, b = torch.randn(7, 83), torch.randn(7, 16), torch.randn(3, 83, 16)
    torch.library.opcheck(torch.ops.trtllm.lora_expand.default, (base, h, b, slots))
    torch.library.opcheck(torch.ops.trtllm.lora_expand.default, (base, torch.randn(7, 32), torch.randn(3, 83, 32),
                                                                 slots, [0, 40, 40, 43]))
