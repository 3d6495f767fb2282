"""fused_moe_fp8: FP8 experts (per-channel and 128x128 block scales) against the plain-torch
references, on both paths (the decode kernels for T <= 16, moe_align's tiles), odd token counts,
experts without tokens and ids of other ranks' experts."""
import pytest
import torch

from trtllm.config import QuantAlgo
from trtllm.kernels.fused_moe import fused_moe_ref
from trtllm.kernels.fused_moe_fp8 import fused_moe_fp8, fused_moe_fp8_ref, fused_moe_fp8_triton
from trtllm.kernels.moe_routing import moe_routing
from trtllm.quantization.fp8_linears import quantize_weight

# What each comparison allows, in one table:
# - "ref": kernel vs fused_moe_fp8_ref (the same quantizations of x and h, fp32 sums): fp32 x
#   differs only in summation order; bf16 x also by the kernel's bf16 rounding of each slot's
#   output before the combine (a few bf16 ulps, as fused_moe's bf16 table).
# - "dequantized": kernel vs fused_moe_ref over the dequantized weights with x and h left
#   unquantized: what e4m3 activations cost (3 mantissa bits, twice), relative norm error.
TOLERANCES = {
    ("ref", torch.float32): dict(atol=1e-5, rtol=1e-4),
    ("ref", torch.bfloat16): dict(atol=2e-2, rtol=2e-2),
    ("dequantized", torch.float32): 0.08,
    ("dequantized", torch.bfloat16): 0.08,
}
ALGOS = {"channel": QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, "block": QuantAlgo.FP8_BLOCK_SCALES}
# block scales: H and 2I span more than one 128 block, the last partial, and one block row of
# W13 holds gate and up rows both (I = 144 is no multiple of 128)
SHAPES = {"channel": (64, 48), "block": (160, 144)}


def quantize_experts(w, granularity):
    """[E, N, K] -> (fp8 weights, scales [E, ..], the dequantized fp32 weights), each expert as
    QuantConfig quantizes a linear."""
    qs = [quantize_weight(w[e], ALGOS[granularity]) for e in range(w.shape[0])]
    return (torch.stack([q.weight for q in qs]), torch.stack([q.weight_scale for q in qs]).contiguous(),
            torch.stack([q.dequantized() for q in qs]))


def make_moe(tokens, experts, top_k, granularity, dtype=torch.float32):
    hidden, inter = SHAPES[granularity]
    x = torch.randn(tokens, hidden).to(dtype)
    w13, s13, d13 = quantize_experts(torch.randn(experts, 2 * inter, hidden) / hidden**0.5, granularity)
    w2, s2, d2 = quantize_experts(torch.randn(experts, hidden, inter) / inter**0.5, granularity)
    weights, ids = moe_routing(torch.randn(tokens, experts), top_k)
    return (x, w13, w2, s13, s2, weights, ids), (d13, d2)


def check(args, dequantized, decode=None):
    x, w13, w2, s13, s2, weights, ids = args
    out = fused_moe_fp8_triton(*args, decode=decode)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    torch.testing.assert_close(out, fused_moe_fp8_ref(*args), **TOLERANCES["ref", x.dtype])
    want = fused_moe_ref(x.float(), *dequantized, weights, ids)
    err = ((out.float() - want).norm() / want.norm()).item()
    assert err <= TOLERANCES["dequantized", x.dtype], err
    return out


@pytest.mark.parametrize("granularity", ["channel", "block"])
@pytest.mark.parametrize("tokens", [1, 7, 83])
@pytest.mark.parametrize("experts,top_k", [(4, 1), (8, 2)])
def test_matches_references(granularity, tokens, experts, top_k):
    check(*make_moe(tokens, experts, top_k, granularity))


@pytest.mark.parametrize("granularity", ["channel", "block"])
@pytest.mark.parametrize("tokens", [7, 16])
def test_decode_path_and_tiles_agree_bf16(granularity, tokens):
    args, dequantized = make_moe(tokens, 8, 2, granularity, torch.bfloat16)
    decoded = check(args, dequantized, decode=True)
    torch.testing.assert_close(decoded, check(args, dequantized, decode=False), **TOLERANCES["ref", torch.bfloat16])


@pytest.mark.parametrize("granularity", ["channel", "block"])
@pytest.mark.parametrize("decode", [True, False])
def test_experts_without_tokens_and_other_ranks_ids(granularity, decode):
    (x, w13, w2, s13, s2, weights, _), dequantized = make_moe(7, 8, 2, granularity)
    ids = torch.tensor([[3, 5]] * 6 + [[-1, 8]], dtype=torch.int32)  # 6 experts get nothing; token 6 none here
    out = check((x, w13, w2, s13, s2, weights, ids), dequantized, decode=decode)
    assert out[6].abs().max() == 0
    s13 = s13.clone()
    s13[[0, 1, 2, 4, 6, 7]] = float("nan")  # an expert no token chose cannot matter
    assert torch.isfinite(fused_moe_fp8_triton(x, w13, w2, s13, s2, weights, ids, decode=decode)).all()


def test_empty():
    args, _ = make_moe(0, 4, 2, "channel")
    assert fused_moe_fp8(*args).shape == (0, SHAPES["channel"][0])


@pytest.mark.parametrize("fn", [fused_moe_fp8, fused_moe_fp8_ref])
def test_bad_input_names_the_argument(fn):
    (x, w13, w2, s13, s2, weights, ids), _ = make_moe(3, 4, 2, "channel")
    with pytest.raises(ValueError, match="w13 must be"):
        fn(x, w13.float(), w2, s13, s2, weights, ids)
    with pytest.raises(ValueError, match="w2 must be"):
        fn(x, w13, w2[:, :, :-1], s13, s2, weights, ids)
    with pytest.raises(ValueError, match="w13_scale, w2_scale"):
        fn(x, w13, w2, s13[:, :1].contiguous(), s2, weights, ids)
    with pytest.raises(ValueError, match="w2_scale must be contiguous fp32"):
        fn(x, w13, w2, s13, s2.double(), weights, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        fn(x, w13, w2, s13, s2, weights, ids.long())


# opcheck's test_schema compares inputs before and after with torch.allclose, which torch
# (2.13, CPU) does not implement for float8_e4m3fn (as tests/kernels/test_fp8_gemm.py says); the rest run.
OPCHECK_TESTS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("granularity", ["channel", "block"])
def test_opcheck(granularity):
    args, _ = make_moe(7, 4, 2, granularity, torch.bfloat16)
    torch.library.opcheck(torch.ops.trtllm.fused_moe_fp8.default, args, test_utils=OPCHECK_TESTS)
