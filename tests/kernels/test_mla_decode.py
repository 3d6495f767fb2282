"""kernels/mla_decode.py: the paged MLA decode kernel against its reference, and the
reference against the expanded attention it stands for (DeepSeek's W_UK / W_UV absorbed)."""
import pytest
import torch

from trtllm.kernels.mla_decode import mla_decode, mla_decode_ref

# Kernel vs reference: fp32 accumulators both; fp16/bf16 round P before P @ C (the kernel)
# and the inputs themselves, so the tolerance follows the element type.
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def make_case(lens, heads, rank, rope, dtype, block_size=16, layers=2, layer=1, seed=0, pad_tokens=0):
    """A cache with each sequence's context already in place but its last row, which the op writes."""
    g = torch.Generator().manual_seed(seed)
    D = rank + rope
    blocks_each = [-(-n // block_size) for n in lens]
    nb = sum(blocks_each) + 3
    cache = (torch.randn((layers, nb, block_size, 1, D), generator=g) * 0.5).to(dtype)
    perm = torch.randperm(nb, generator=g).tolist()  # blocks scattered through the pool
    tables, slots, new = [], [], []
    for n, k in zip(lens, blocks_each):
        blocks, perm = perm[:k], perm[k:]
        tables.append(blocks + [0] * (max(blocks_each) - k))
        p = n - 1
        slots.append(blocks[p // block_size] * block_size + p % block_size)
        new.append(cache[layer, blocks[p // block_size], p % block_size, 0].clone())
        cache[layer, blocks[p // block_size], p % block_size, 0] = 0  # the op must write it
    T = len(lens) + pad_tokens
    latent = torch.stack(new + [torch.zeros(D, dtype=dtype)] * pad_tokens)
    q_latent = torch.randn((T, heads, rank), generator=g).to(dtype)
    q_rope = torch.randn((T, heads, rope), generator=g).to(dtype)
    slot_mapping = torch.tensor(slots + [-1] * pad_tokens, dtype=torch.int32)
    block_tables = torch.tensor(tables + [[0] * max(blocks_each)] * pad_tokens, dtype=torch.int32)
    seq_lens = torch.tensor(list(lens) + [0] * pad_tokens, dtype=torch.int32)
    return q_latent, q_rope, latent, cache, layer, slot_mapping, block_tables, seq_lens


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("lens, heads, rank, rope", [
    ([1], 16, 32, 16),            # a sequence of one token
    ([7, 83, 17], 5, 48, 8),      # odd heads (one padded block), rope narrower than a dot's 16
    ([33, 2], 20, 64, 24),        # two head blocks, non-power-of-2 rope
    ([130], 16, 512, 64),         # DeepSeek-V2-Lite's latent geometry
])
def test_mla_decode_matches_reference(lens, heads, rank, rope, dtype):
    case = make_case(lens, heads, rank, rope, dtype)
    q_latent, q_rope, latent, cache, layer, slots, tables, seq_lens = case
    ref_cache = cache.clone()
    scale = (rank // 4 + rope) ** -0.5
    out = mla_decode(q_latent, q_rope, latent, cache, layer, slots, tables, seq_lens, scale, len(lens), max(lens))
    ref = mla_decode_ref(q_latent, q_rope, latent, ref_cache, layer, slots, tables, seq_lens, scale, len(lens),
                         max(lens))
    assert out.shape == (len(lens), heads, rank) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOLERANCES[dtype])
    assert torch.equal(cache, ref_cache)  # the new rows written, nothing else touched


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_splits_merge_to_the_same_answer(splits):
    """Forced flash-decoding splits, including splits past a short sequence's end (empty)."""
    from trtllm.kernels.mla_decode import launch_mla_decode
    case = make_case([50, 3, 19], 16, 32, 16, torch.float32)
    q_latent, q_rope, latent, cache, layer, slots, tables, seq_lens = case
    ref = mla_decode_ref(*[t.clone() if isinstance(t, torch.Tensor) else t for t in case], 0.3, 3, 50)
    out = launch_mla_decode(*case, 0.3, 3, 50, splits=splits)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_padding_tokens_are_not_written_and_give_zeros():
    """A decode graph's padding rows: slot -1 (nothing written), seq_len 0 (output 0)."""
    case = make_case([9, 4], 16, 32, 16, torch.float32, pad_tokens=3)
    q_latent, q_rope, latent, cache, layer, slots, tables, seq_lens = case
    before = cache.clone()
    out = mla_decode(q_latent, q_rope, latent, cache, layer, slots, tables, seq_lens, 0.25, 5, 9)
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))
    changed = (cache != before).any(dim=-1).nonzero().tolist()
    assert len(changed) == 2  # the two real sequences' new rows only


def test_reference_is_the_expanded_attention():
    """Absorbed form == DeepSeek's expanded heads: k = [W_UK c, k_r], v = W_UV c, SDPA, then
    the kernel's latent output taken through W_UV."""
    torch.manual_seed(0)
    H, R, P, dn, dv, L = 4, 32, 8, 16, 12, 23
    case = make_case([L], H, R, P, torch.float32)
    _, _, latent, cache, layer, slots, tables, seq_lens = case
    w_kv_b = torch.randn(H * (dn + dv), R) * 0.2
    w = w_kv_b.view(H, dn + dv, R)
    q_nope, q_rope = torch.randn(1, H, dn), torch.randn(1, H, P)
    scale = (dn + P) ** -0.5
    q_latent = torch.einsum("thd,hdr->thr", q_nope, w[:, :dn])
    out_latent = mla_decode_ref(q_latent, q_rope, latent, cache, layer, slots, tables, seq_lens, scale, 1, L)
    out = torch.einsum("thr,hvr->thv", out_latent, w[:, dn:])

    rows = torch.stack([cache[layer, tables[0, j // 16], j % 16, 0] for j in range(L)])  # [L, R + P]
    kv = torch.einsum("lr,hdr->hld", rows[:, :R], w)  # [H, L, dn + dv]
    k = torch.cat([kv[..., :dn], rows[None, :, R:].expand(H, L, P)], -1)
    q = torch.cat([q_nope, q_rope], -1).transpose(0, 1)  # [H, 1, dn + P]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, kv[..., dn:], scale=scale)
    torch.testing.assert_close(out, expected.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_refused():
    case = list(make_case([5], 16, 32, 16, torch.float32))
    case[1] = case[1][..., :8]  # q_rope narrower than the cache's rope part
    with pytest.raises(AssertionError, match="q_rope"):
        mla_decode(*case, 0.3, 1, 5)


def test_opcheck():
    case = make_case([12, 3], 16, 32, 16, torch.float32)
    torch.library.opcheck(torch.ops.trtllm.mla_decode.default, (*case, 0.3, 2, 12))
