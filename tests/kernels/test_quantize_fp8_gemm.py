import pytest
import torch

from trtllm.kernels.fp8_gemm import FP8_DTYPE, FP8_MAX, fp8_gemv
from trtllm.kernels.fp8_gemm_configs import Fp8GemvConfig
from trtllm.kernels.quantize_fp8 import quantize_fp8, quantize_fp8_ref
from trtllm.kernels.quantize_fp8_gemm import quantize_fp8_gemm, quantize_fp8_gemm_ref, quantize_fp8_gemv, round_to_e4m3

# Fused kernel vs reference: x quantizes to the same e4m3 values and scales (checked exactly
# below), the fp8 x fp8 products are exact in fp32; what differs is the order of the fp32 sums
# and where the scales multiply, plus a 1-ulp rounding flip of a 16-bit output.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
GEMV = Fp8GemvConfig(block_n=64, block_k=64, num_warps=4, num_stages=2)
GEMV_K256 = Fp8GemvConfig(block_n=32, block_k=256, num_warps=4, num_stages=2)
# Odd N and K (masked tails), K a multiple of BLOCK_K (no K mask), 1 to 16 rows.
SHAPES = [(1, 83, 769), (3, 769, 83), (7, 130, 256), (16, 7, 5125), (2, 83, 128)]


def make_inputs(m, n, k, x_dtype, per_channel, bias):
    x = (torch.randn(m, k) * torch.rand(m, 1) * 4).to(x_dtype)  # rows of different magnitudes
    weight = (torch.randn(n, k) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    ws = torch.rand((n, 1) if per_channel else (1,)) * 0.02 + 0.005  # fresh, never ones
    return x, weight, ws, torch.randn(n) if bias else None


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_fused_gemv_matches_reference(m, n, k, x_dtype, out_dtype):
    x, weight, ws, bias = make_inputs(m, n, k, x_dtype, per_channel=m % 2 == 1, bias=n % 2 == 1)
    config = GEMV_K256 if k % 2 == 0 else GEMV
    out = quantize_fp8_gemv(x, weight, ws, bias, torch.empty(m, n, dtype=out_dtype), config)
    torch.testing.assert_close(out, quantize_fp8_gemm_ref(x, weight, ws, bias, out_dtype), **TOLERANCES[out_dtype])


@pytest.mark.parametrize("m,n,k", SHAPES[:3])
def test_fused_gemv_is_the_two_ops(m, n, k):
    """The unfused path (quantize_fp8, then the fp8 GEMV with the same config) gives the same
    fp32 outputs bit for bit: the same e4m3 x, scales and sums in the same order."""
    x, weight, ws, bias = make_inputs(m, n, k, torch.bfloat16, per_channel=True, bias=True)
    fused = quantize_fp8_gemv(x, weight, ws, bias, torch.empty(m, n), GEMV)
    xq, xs = quantize_fp8(x, None)
    torch.testing.assert_close(fused, fp8_gemv(xq, weight, xs, ws, bias, torch.empty(m, n), GEMV), atol=0, rtol=0)


def test_rows_with_a_stride_and_zeros():
    x, weight, ws, _ = make_inputs(4, 83, 300, torch.bfloat16, per_channel=True, bias=False)
    wide = torch.randn(4, 512).to(torch.bfloat16)
    wide[:, :300] = x
    wide[2, :300] = 0  # an all-zero row: scale MIN_AMAX / 448, output exactly 0
    out = quantize_fp8_gemm(wide[:, :300], weight, ws)
    torch.testing.assert_close(out, quantize_fp8_gemm_ref(wide[:, :300].contiguous(), weight, ws),
                               **TOLERANCES[torch.bfloat16])
    assert out[2].abs().max() == 0


def test_more_rows_than_the_gemv_run_the_two_ops():
    x, weight, ws, bias = make_inputs(17, 83, 128, torch.bfloat16, per_channel=True, bias=True)
    torch.testing.assert_close(quantize_fp8_gemm(x, weight, ws, bias),
                               quantize_fp8_gemm_ref(x, weight, ws, bias), **TOLERANCES[torch.bfloat16])
    assert quantize_fp8_gemm(x[:0], weight, ws).shape == (0, 83)


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


def test_refuses_block_scales_and_fp8_x_by_name():
    x, weight, ws, _ = make_inputs(2, 256, 256, torch.bfloat16, per_channel=True, bias=False)
    with pytest.raises(AssertionError, match="weight_scale .*per-tensor"):
        quantize_fp8_gemm(x, weight, torch.rand(2, 2))
    xq, _ = quantize_fp8_ref(x)
    with pytest.raises(AssertionError, match="x: dtype torch.float8_e4m3fn"):
        quantize_fp8_gemm(xq, weight, ws)
    with pytest.raises(AssertionError, match="out_dtype"):
        quantize_fp8_gemm(x, weight, ws, None, torch.int8)


def test_opcheck():
    x, weight, ws, bias = make_inputs(3, 83, 64, torch.bfloat16, per_channel=True, bias=True)
    # test_schema compares inputs with torch.allclose, not implemented for float8_e4m3fn on CPU
    tests = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.trtllm.quantize_fp8_gemm.default, (x, weight, ws, bias, torch.float16),
                          test_utils=tests)
