import pytest
import torch
import torch.nn.functional as F

from trtllm.kernels.fused_moe import fused_moe, fused_moe_ref
from trtllm.kernels.moe_routing import moe_routing

# Kernel vs reference. fp32: same products, other summation order. bf16: the kernel runs here
# in fp32 (registry.interpreter_upcast) but on the GPU rounds h and each expert's output to
# bf16 before the combine; the table allows for that (a few bf16 ulps of the output).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
HIDDEN, INTER = 32, 64


def make_moe(tokens, experts, top_k, dtype, hidden=HIDDEN, inter=INTER, device="cpu"):
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device) / inter**0.5).to(dtype)
    weights, ids = moe_routing(torch.randn(tokens, experts, device=device), top_k)
    return x, w13, w2, weights, ids


def check(x, w13, w2, weights, ids):
    out = fused_moe(x, w13, w2, weights, ids)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, weights, ids), **TOLERANCES[x.dtype])
    return out


@pytest.mark.parametrize("tokens", [1, 7, 83])
@pytest.mark.parametrize("experts,top_k", [(4, 1), (8, 2), (64, 8)])
def test_matches_reference_fp32(tokens, experts, top_k):
    check(*make_moe(tokens, experts, top_k, torch.float32))


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 2), (83, 4, 2), (7, 64, 8)])
def test_matches_reference_bf16(tokens, experts, top_k):
    check(*make_moe(tokens, experts, top_k, torch.bfloat16))


@pytest.mark.slow
@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", [(769, 128, 8, 48, 80), (83, 64, 8, 96, 160)])
def test_matches_reference_larger(tokens, experts, top_k, hidden, inter):
    check(*make_moe(tokens, experts, top_k, torch.float32, hidden, inter))


def test_reference_is_hf_expert_loop():
    """fused_moe_ref == HF's DeepseekV3Experts / Qwen3MoeExperts loop (fp32)."""
    x, w13, w2, weights, ids = make_moe(23, 8, 2, torch.float32)
    expected = torch.zeros_like(x)
    mask = F.one_hot(ids.long(), num_classes=8).permute(2, 1, 0)
    for e in range(8):
        pos, token_idx = torch.where(mask[e])
        gate, up = F.linear(x[token_idx], w13[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, w2[e]) * weights[token_idx, pos, None]
        expected.index_add_(0, token_idx, h)
    torch.testing.assert_close(fused_moe_ref(x, w13, w2, weights, ids), expected, atol=1e-6, rtol=1e-5)


def test_experts_without_tokens():
    x, w13, w2, weights, _ = make_moe(7, 8, 2, torch.float32)
    ids = torch.tensor([[3, 5]] * 7, dtype=torch.int32)  # 6 of the 8 experts get nothing
    check(x, w13, w2, weights, ids)
    # An expert's weights that no token chose cannot matter.
    w13[[0, 1, 2, 4, 6, 7]] = float("nan")
    assert torch.isfinite(fused_moe(x, w13, w2, weights, ids)).all()


def test_combine_is_weighted():
    x, w13, w2, weights, ids = make_moe(7, 8, 2, torch.float32)
    single = fused_moe(x, w13, w2, torch.ones(7, 1), ids[:, :1].contiguous())
    torch.testing.assert_close(fused_moe(x, w13, w2, torch.ones(7, 1) * 3, ids[:, :1].contiguous()), 3 * single)


def test_ids_of_other_ranks_experts_add_nothing():
    # expert parallelism: this rank holds experts 2, 3 of 4 (ids shifted by 2); k=2 > its 1 expert
    x, w13, w2, weights, ids = make_moe(7, 4, 2, torch.float32)
    whole = fused_moe_ref(x, w13, w2, weights * (ids == 3), ids)  # expert 3's share of every token
    one = check(x, w13[3:].contiguous(), w2[3:].contiguous(), weights, ids - 3)
    torch.testing.assert_close(one, whole, atol=1e-5, rtol=1e-4)


def test_empty():
    x, w13, w2, weights, ids = make_moe(0, 4, 2, torch.float32)
    assert fused_moe(x, w13, w2, weights, ids).shape == (0, HIDDEN)


@pytest.mark.parametrize("fn", [fused_moe, fused_moe_ref])
def test_bad_input_names_the_argument(fn):
    x, w13, w2, weights, ids = make_moe(3, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="w13"):
        fn(x, w13[:, :, :-1], w2, weights, ids)
    with pytest.raises(ValueError, match="w2"):
        fn(x, w13, w2[:, :, :-1], weights, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        fn(x, w13, w2, weights, ids.long())
    with pytest.raises(ValueError, match="topk_ids"):
        fn(x[:2], w13, w2, weights, ids)
    with pytest.raises(ValueError, match="topk_weights"):
        fn(x, w13, w2, weights[:, :1], ids)
    with pytest.raises(ValueError, match="dtype"):
        fn(x, w13.to(torch.bfloat16), w2, weights, ids)


def test_opcheck():
    torch.library.opcheck(torch.ops.trtllm.fused_moe.default, make_moe(7, 4, 2, torch.bfloat16))


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 4, 1), (1, 64, 8), (16, 4, 2), (16, 8, 1), (5, 8, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_path_matches_the_tiles_and_the_reference(tokens, experts, top_k, dtype):
    """T <= 16: kernels/fused_moe_decode.py (the default there) against the grouped GEMM over
    moe_align's tiles and the reference; experts chosen by several tokens, by none, and ids of
    another rank (-1, E) that add nothing."""
    from trtllm.kernels.fused_moe import fused_moe_triton

    x, w13, w2, weights, ids = make_moe(tokens, experts, top_k, dtype)
    decoded = fused_moe_triton(x, w13, w2, weights, ids, decode=True)
    torch.testing.assert_close(decoded, fused_moe_triton(x, w13, w2, weights, ids, decode=False),
                               **TOLERANCES[dtype])
    torch.testing.assert_close(decoded, fused_moe_ref(x, w13, w2, weights, ids), **TOLERANCES[dtype])
    foreign = ids.clone()
    foreign[0, 0], foreign[-1, -1] = -1, experts
    torch.testing.assert_close(fused_moe_triton(x, w13, w2, weights, foreign, decode=True),
                               fused_moe_ref(x, w13, w2, weights, foreign), **TOLERANCES[dtype])


def test_decode_path_takes_at_most_16_tokens():
    from trtllm.kernels.fused_moe import fused_moe_triton

    with pytest.raises(AssertionError, match="at most 16"):
        fused_moe_triton(*make_moe(17, 4, 2, torch.float32), decode=True)


def test_decode_down_writes_zeros_for_other_ranks_slots():
    """The decode path's output buffer is not zeroed beforehand (one launch fewer a layer): the
    down kernel writes the zeros of slots whose expert another rank holds (ids -1 and E), and
    leaves the real slots' products. A buffer of NaNs shows any row it missed."""
    from trtllm.kernels.fused_moe_decode import decode_config, launch_decode_down

    x, w13, w2, weights, ids = make_moe(3, 4, 2, torch.float32)
    ids[0, 1], ids[2, 0] = -1, 4
    h = torch.randn(ids.numel(), w2.shape[2])
    o = torch.full((ids.numel(), w2.shape[1]), float("nan"))
    launch_decode_down(h, None, w2, None, o, weights.contiguous(), ids.contiguous(), 0,
                       decode_config(w2.shape[1], w2.shape[2], block_scales=False), "ieee")
    assert not o.isnan().any()
    for slot, e in enumerate(ids.flatten().tolist()):
        want = torch.zeros(w2.shape[1]) if not 0 <= e < 4 else weights.flatten()[slot] * (w2[e] @ h[slot])
        torch.testing.assert_close(o[slot], want, rtol=1e-5, atol=1e-5)
