import pytest
import torch

from trtllm.kernels.add_rms_norm_gemv import (
    MAX_K,
    NormGemvConfig,
    add_rms_norm_fp8_gemm,
    add_rms_norm_fp8_gemm_ref,
    add_rms_norm_gemv,
    add_rms_norm_linear,
    add_rms_norm_linear_ref,
)
from trtllm.kernels.fp8_gemm import FP8_DTYPE, FP8_MAX, fp8_gemm_triton
from trtllm.kernels.linear import linear_triton
from trtllm.kernels.rms_norm import fused_add_rms_norm_ref, fused_add_rms_norm_triton, norm_add_rms_norm_triton
from trtllm.kernels.rms_norm_quant_fp8 import fused_add_rms_norm_quant_fp8_triton

# y against the reference: the norm's output (and its e4m3 values) are the reference's, bit for
# bit; the dot products differ in the order of their fp32 sums, plus a 1-ulp flip of a 16-bit
# output. s (the residual sum) is compared exactly.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
# (N, K): odd N and K (masked row tails and a last block past N); K up to MAX_K
SHAPES = [(83, 769), (769, 83), (130, 1024), (7, 5125)]
CONFIGS = [NormGemvConfig(block_n=2, num_warps=4, programs_per_sm=2),   # 6 programs interpreted: a loop
           NormGemvConfig(block_n=4, num_warps=4, programs_per_sm=0),   # one program a block
           NormGemvConfig(block_n=2, num_warps=4, programs_per_sm=1, prefetch=True)]  # a loop, a block ahead


def make_inputs(m, n, k, dtype, fp8, bias, unit_offset=False):
    x = (torch.randn(m, k) * 2).to(dtype)
    residual = (torch.randn(m, k) * torch.rand(m, 1) * 4).to(dtype)  # rows of different magnitudes
    norm_weight = (torch.rand(k) * (0.4 if unit_offset else 1.5) + 0.2).to(dtype)
    if fp8:
        weight = (torch.randn(n, k) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        ws = torch.rand(n, 1) * 0.02 + 0.005  # fresh, never ones
    else:
        weight, ws = (torch.randn(n, k) / k ** 0.5).to(dtype), None
    return x, residual, norm_weight, weight, ws, (torch.randn(n).to(dtype) if bias else None)


@pytest.mark.parametrize("config", CONFIGS, ids=["loop", "grid", "prefetch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", SHAPES)
def test_one_row_linear_matches_reference(n, k, dtype, config):
    unit_offset = n % 2 == 0
    x, r, nw, w, _, bias = make_inputs(1, n, k, dtype, fp8=False, bias=k % 2 == 1, unit_offset=unit_offset)
    out = torch.empty(1, n, dtype=dtype)
    y, s = add_rms_norm_gemv(x, r, nw, 1e-5, unit_offset, w, bias, out, config=config)
    want_y, want_s = add_rms_norm_linear_ref(x, r, nw, 1e-5, unit_offset, w, bias)
    torch.testing.assert_close(s, want_s, atol=0, rtol=0)
    torch.testing.assert_close(y, want_y, **TOLERANCES[dtype])


@pytest.mark.parametrize("config", CONFIGS, ids=["loop", "grid", "prefetch"])
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", SHAPES)
def test_one_row_fp8_matches_reference(n, k, dtype, static, config):
    unit_offset = k % 2 == 0
    x, r, nw, w, ws, bias = make_inputs(1, n, k, dtype, fp8=True, bias=n % 2 == 1, unit_offset=unit_offset)
    if n == 7:
        ws = ws[:1, 0]  # per tensor
    # a static scale below the row's own (amax / 448): some values saturate at +-448
    normed, _ = fused_add_rms_norm_ref(x, r, nw, 1e-5, unit_offset)
    scale = (normed.float().abs().max() / FP8_MAX * 0.7).reshape(1) if static else None
    want_y, want_s = add_rms_norm_fp8_gemm_ref(x, r, nw, 1e-5, unit_offset, w, ws, bias, torch.float32, scale)
    y, s = add_rms_norm_gemv(x, r, nw, 1e-5, unit_offset, w, bias, torch.empty(1, n), weight_scale=ws,
                             input_scale=scale, config=config)
    torch.testing.assert_close(s, want_s, atol=0, rtol=0)
    torch.testing.assert_close(y, want_y, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("m", [0, 2, 17])
def test_other_row_counts_run_the_two_ops(m):
    x, r, nw, w, _, bias = make_inputs(m, 83, 128, torch.bfloat16, fp8=False, bias=True)
    y, s = add_rms_norm_linear(x, r, nw, 1e-5, False, w, bias)
    normed, summed = fused_add_rms_norm_triton(x, r, nw, 1e-5)
    torch.testing.assert_close(s, summed, atol=0, rtol=0)
    torch.testing.assert_close(y, linear_triton(normed, w, bias), atol=0, rtol=0)
    x, r, nw, w, ws, bias = make_inputs(m, 83, 128, torch.bfloat16, fp8=True, bias=True)
    for scale in (None, torch.tensor([0.01])):
        y, s = add_rms_norm_fp8_gemm(x, r, nw, 1e-5, False, w, ws, bias, torch.bfloat16, scale)
        xq, xs, summed = fused_add_rms_norm_quant_fp8_triton(x, r, nw, 1e-5, None, False, scale)
        assert y.shape == (m, 83) and s.shape == (m, 128)
        torch.testing.assert_close(s, summed, atol=0, rtol=0)
        want = fp8_gemm_triton(xq, w, xs if scale is None else scale, ws, bias, torch.bfloat16)
        torch.testing.assert_close(y, want, atol=0, rtol=0)


def test_a_row_wider_than_registers_hold_runs_the_two_ops():
    x, r, nw, w, _, _ = make_inputs(1, 5, MAX_K + 8, torch.float32, fp8=False, bias=False)
    y, s = add_rms_norm_linear(x, r, nw, 1e-5, False, w)
    want_y, want_s = add_rms_norm_linear_ref(x, r, nw, 1e-5, False, w)
    torch.testing.assert_close(y, want_y, **TOLERANCES[torch.float32])
    torch.testing.assert_close(s, want_s, atol=0, rtol=0)


def test_refuses_mismatched_operands_by_name():
    x, r, nw, w, ws, _ = make_inputs(1, 64, 128, torch.bfloat16, fp8=True, bias=False)
    with pytest.raises(AssertionError, match="residual"):
        add_rms_norm_fp8_gemm(x, r.float(), nw, 1e-5, False, w, ws)
    with pytest.raises(AssertionError, match="norm_weight"):
        add_rms_norm_fp8_gemm(x, r, nw[:64], 1e-5, False, w, ws)
    with pytest.raises(AssertionError, match="weight_scale .*per-tensor"):
        add_rms_norm_fp8_gemm(x, r, nw, 1e-5, False, w, torch.rand(2, 2))
    with pytest.raises(AssertionError, match="weight dtype"):
        add_rms_norm_linear(x, r, nw, 1e-5, False, w)


def test_opcheck():
    x, r, nw, w, _, bias = make_inputs(1, 83, 64, torch.bfloat16, fp8=False, bias=True)
    torch.library.opcheck(torch.ops.trtllm.add_rms_norm_linear.default, (x, r, nw, 1e-5, False, w, bias))
    x, r, nw, w, ws, bias = make_inputs(1, 83, 64, torch.bfloat16, fp8=True, bias=True)
    # test_schema compares inputs with torch.allclose, not implemented for float8_e4m3fn on CPU
    tests = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.trtllm.add_rms_norm_fp8_gemm.default,
                          (x, r, nw, 1e-5, False, w, ws, bias, torch.float16), test_utils=tests)
    torch.library.opcheck(torch.ops.trtllm.add_rms_norm_fp8_gemm.default,
                          (x, r, nw, 1e-5, True, w, ws, bias, torch.float16, torch.tensor([0.02])),
                          test_utils=tests)


@pytest.mark.parametrize("lead", [(1, 1), (2, 3)])
def test_leading_dims_are_kept(lead):
    """The ops take [..., K] as the graph has them (one row or several): y [..., N], s x's shape."""
    x, r, nw, w, _, bias = make_inputs(1, 83, 128, torch.bfloat16, fp8=False, bias=True)
    x, r = (torch.randn(*lead, 128) * 2).to(torch.bfloat16), torch.randn(*lead, 128).to(torch.bfloat16)
    y, s = add_rms_norm_linear(x, r, nw, 1e-5, False, w, bias)
    want_y, want_s = add_rms_norm_linear_ref(x, r, nw, 1e-5, False, w, bias)
    assert y.shape == (*lead, 83) and s.shape == x.shape
    torch.testing.assert_close(s, want_s, atol=0, rtol=0)
    torch.testing.assert_close(y, want_y, **TOLERANCES[torch.bfloat16])
    _, _, _, w8, ws, _ = make_inputs(1, 83, 128, torch.bfloat16, fp8=True, bias=False)
    y, s = add_rms_norm_fp8_gemm(x, r, nw, 1e-5, False, w8, ws, None, torch.float32)
    assert y.shape == (*lead, 83) and s.shape == x.shape
    if lead == (1, 1):
        want_y, want_s = add_rms_norm_fp8_gemm_ref(x, r, nw, 1e-5, False, w8, ws, None, torch.float32)
        torch.testing.assert_close(y, want_y, **TOLERANCES[torch.float32])
    else:  # the two (interpreted) kernels, on the rows
        xq, xs, want_s = fused_add_rms_norm_quant_fp8_triton(x.view(-1, 128), r.view(-1, 128), nw, 1e-5)
        torch.testing.assert_close(y.view(-1, 83), fp8_gemm_triton(xq, w8, xs, ws, None, torch.float32), atol=0, rtol=0)
    torch.testing.assert_close(s.view(-1, 128), want_s.view(-1, 128), atol=0, rtol=0)


@pytest.mark.parametrize("unit_offset", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3])
def test_a_norm_before_the_add_is_gemmas_sandwich(m, dtype, unit_offset):
    """pre_weight: x is first normed (a block's output norm), then added and normed again
    (norm_add_rms_norm); one row in the kernel, more in the two ops."""
    x, r, nw, w, _, bias = make_inputs(m, 83, 769, dtype, fp8=False, bias=True, unit_offset=unit_offset)
    pre = (torch.rand(769) * 0.4 + 0.2).to(dtype)
    y, s = add_rms_norm_linear(x, r, nw, 1e-6, unit_offset, w, bias, pre)
    want_y, want_s = add_rms_norm_linear_ref(x, r, nw, 1e-6, unit_offset, w, bias, pre)
    if m == 1:
        torch.testing.assert_close(s, want_s, atol=0, rtol=0)
        torch.testing.assert_close(y, want_y, **TOLERANCES[dtype])
    else:  # the two (interpreted) kernels
        normed, summed = norm_add_rms_norm_triton(x, pre, r, nw, 1e-6, unit_offset)
        torch.testing.assert_close(s, summed, atol=0, rtol=0)
        torch.testing.assert_close(y, linear_triton(normed, w, bias), atol=0, rtol=0)
    without, _ = add_rms_norm_linear_ref(x, r, nw, 1e-6, unit_offset, w, bias)
    assert (without.float() - want_y.float()).abs().max() > 0.1  # the first norm matters
