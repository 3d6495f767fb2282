import pytest
import torch

from trtllm.kernels.fp8_gemm import FP8_DTYPE, FP8_MAX
from trtllm.kernels.fp8_gemm_configs import Fp8GemvConfig
from trtllm.kernels.quantize_fp8 import quantize_fp8_ref
from trtllm.kernels.quantize_fp8_gemm import quantize_fp8_gemm, quantize_fp8_gemm_ref, quantize_fp8_gemv, round_to_e4m3

# Fused kernel vs reference: x quantizes to the same e4m3 values and scale, the fp8 x e4m3
# products are exact in fp32; what differs is the order of the fp32 sums and where the scales
# multiply, plus a 1-ulp rounding flip of a 16-bit output.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
SMALL = Fp8GemvConfig(block_n=16, block_k=256, num_warps=4, num_stages=1)  # K tails at odd K
# (N, K): odd N and K (masked tails); K a multiple of the step (no K mask)
SHAPES = [(83, 769), (769, 83), (130, 1024), (7, 5125)]


def make_inputs(m, n, k, x_dtype, per_channel, bias):
    x = (torch.randn(m, k) * torch.rand(m, 1) * 4).to(x_dtype)  # rows of different magnitudes
    weight = (torch.randn(n, k) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    ws = torch.rand((n, 1) if per_channel else (1,)) * 0.02 + 0.005  # fresh, never ones
    return x, weight, ws, torch.randn(n) if bias else None


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", SHAPES)
def test_one_row_matches_reference(n, k, x_dtype, out_dtype):
    x, weight, ws, bias = make_inputs(1, n, k, x_dtype, per_channel=k % 2 == 1, bias=n % 2 == 1)
    config = SMALL if k % 2 else Fp8GemvConfig(block_n=8, block_k=1024, num_warps=4, num_stages=1)
    out = quantize_fp8_gemv(x, weight, ws, bias, torch.empty(1, n, dtype=out_dtype), config)
    torch.testing.assert_close(out, quantize_fp8_gemm_ref(x, weight, ws, bias, out_dtype), **TOLERANCES[out_dtype])


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", SHAPES)
def test_one_row_with_a_static_scale_matches_reference(n, k, x_dtype):
    """input_scale: x quantizes by the checkpoint's scale (quantize_fp8_static's formula); the
    scale is below the row's amax / 448, so some values saturate at +-448."""
    x, weight, ws, bias = make_inputs(1, n, k, x_dtype, per_channel=k % 2 == 0, bias=n % 2 == 0)
    input_scale = (x.float().abs().max() / FP8_MAX * 0.7).reshape(1)
    config = SMALL if k % 2 else Fp8GemvConfig(block_n=8, block_k=1024, num_warps=4, num_stages=1)
    out = quantize_fp8_gemv(x, weight, ws, bias, torch.empty(1, n), config, input_scale=input_scale)
    want = quantize_fp8_gemm_ref(x, weight, ws, bias, torch.float32, input_scale)
    torch.testing.assert_close(out, want, **TOLERANCES[torch.float32])
    per_token = quantize_fp8_gemm_ref(x, weight, ws, bias, torch.float32)
    assert (want - per_token).abs().max() > 1e-2  # the static scale is not the row's own


@pytest.mark.parametrize("m", [0, 1, 2, 17])
def test_the_op_with_a_static_scale_at_every_row_count(m):
    x, weight, ws, bias = make_inputs(m, 83, 128, torch.bfloat16, per_channel=True, bias=True)
    input_scale = torch.tensor([0.011])
    out = quantize_fp8_gemm(x, weight, ws, bias, torch.float32, input_scale)
    torch.testing.assert_close(out, quantize_fp8_gemm_ref(x, weight, ws, bias, torch.float32, input_scale),
                               **TOLERANCES[torch.float32])


def test_the_op_takes_a_row_with_a_stride_and_a_row_of_zeros():
    x, weight, ws, _ = make_inputs(1, 83, 300, torch.bfloat16, per_channel=True, bias=False)
    wide = torch.randn(2, 512).to(torch.bfloat16)
    wide[0, :300] = x[0]
    torch.testing.assert_close(quantize_fp8_gemm(wide[:1, :300], weight, ws),
                               quantize_fp8_gemm_ref(x, weight, ws), **TOLERANCES[torch.bfloat16])
    zeros = torch.zeros(1, 300, dtype=torch.bfloat16)  # scale MIN_AMAX / 448: exactly 0 out
    assert quantize_fp8_gemm(zeros, weight, ws).abs().max() == 0


@pytest.mark.parametrize("m", [0, 2, 17])
def test_other_row_counts_run_the_two_ops(m):
    x, weight, ws, bias = make_inputs(m, 83, 128, torch.bfloat16, per_channel=True, bias=True)
    out = quantize_fp8_gemm(x, weight, ws, bias)
    assert out.shape == (m, 83)
    torch.testing.assert_close(out, quantize_fp8_gemm_ref(x, weight, ws, bias), **TOLERANCES[torch.bfloat16])


def test_round_to_e4m3_is_torchs_cast():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, round_to_e4m3(tl.load(x_ptr + offs)))

    # every e4m3 value, the midpoints between neighbours (ties), and random values of every magnitude
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = grid[grid.isfinite()].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    rand = torch.randn(4096) * torch.logspace(-4, 2.6, 4096)
    x = torch.cat([grid, mids, rand.clamp(-FP8_MAX, FP8_MAX)])
    x = torch.nn.functional.pad(x, (0, -x.numel() % 1024))
    y = torch.empty_like(x)
    kernel[(x.numel() // 1024,)](x, y, BLOCK=1024)
    torch.testing.assert_close(y, x.to(FP8_DTYPE).float(), atol=0, rtol=0)


def test_refuses_block_scales_fp8_x_and_other_outputs_by_name():
    x, weight, ws, _ = make_inputs(1, 256, 256, torch.bfloat16, per_channel=True, bias=False)
    with pytest.raises(AssertionError, match="weight_scale .*per-tensor"):
        quantize_fp8_gemm(x, weight, torch.rand(2, 2))
    xq, _ = quantize_fp8_ref(x)
    with pytest.raises(AssertionError, match="x: dtype torch.float8_e4m3fn"):
        quantize_fp8_gemm(xq, weight, ws)
    with pytest.raises(AssertionError, match="out_dtype"):
        quantize_fp8_gemm(x, weight, ws, None, torch.int8)
    with pytest.raises(AssertionError, match=r"input_scale: torch.float32 \(1, 1\), expected one fp32"):
        quantize_fp8_gemm(x, weight, ws, None, torch.bfloat16, torch.ones(1, 1))
    with pytest.raises(AssertionError, match="a static input scale leaves no amax"):
        quantize_fp8_gemv(x, weight, ws, None, torch.empty(1, 256), amax_parts=torch.ones(2),
                          input_scale=torch.ones(1))


def test_opcheck():
    x, weight, ws, bias = make_inputs(1, 83, 64, torch.bfloat16, per_channel=True, bias=True)
    # test_schema compares inputs with torch.allclose, not implemented for float8_e4m3fn on CPU
    tests = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.trtllm.quantize_fp8_gemm.default, (x, weight, ws, bias, torch.float16),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.trtllm.quantize_fp8_gemm.default,
                          (x, weight, ws, bias, torch.float16, torch.tensor([0.02])), test_utils=tests)
