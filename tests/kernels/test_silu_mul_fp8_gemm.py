import pytest
import torch

from trtllm.kernels.fp8_gemm import FP8_DTYPE, FP8_MAX
from trtllm.kernels.silu_mul_fp8_gemm import BLOCK_H, silu_mul_fp8_gemm, silu_mul_fp8_gemm_ref

# Fused kernels vs reference, as the largest error over the largest |output|, by output dtype:
# h is the same (interpreted bf16 too: round_to_bf16) and quantizes to the same e4m3 values
# and scale, the fp8 x e4m3 products are exact in fp32; what differs is the order of the fp32
# sums (~4e-7 measured) and a 16-bit output's rounding (one ulp of an element).
TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def check(out, ref, out_dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype == out_dtype
    peak = ref.float().abs().amax().clamp_min(1e-6) if ref.numel() else 1.0
    torch.testing.assert_close(out.float() / peak, ref.float() / peak, rtol=0, atol=TOLERANCES[out_dtype])


# (N, K): odd N and K (a partial last slice of h), K over several slices, one slice exactly
SHAPES = [(83, 769), (7, 5125), (130, 2 * BLOCK_H), (769, 83)]


def make_inputs(m, n, k, dtype, per_channel, bias, peak_at=None):
    gate_up = torch.randn(m, 2 * k) * 3
    if peak_at is not None:  # the row's amax in one slice of h: every program's part must count
        gate_up[:, peak_at] = 12.0
        gate_up[:, k + peak_at] = 9.0
    gate, up = gate_up.to(dtype).chunk(2, dim=1)  # halves of one [M, 2K] output: row stride 2K
    weight = (torch.randn(n, k) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    ws = torch.rand((n, 1) if per_channel else (1,)) * 0.02 + 0.005  # fresh, never ones
    return gate, up, weight, ws, torch.randn(n) if bias else None


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", SHAPES)
def test_one_row_matches_reference(n, k, dtype, out_dtype):
    gate, up, weight, ws, bias = make_inputs(1, n, k, dtype, per_channel=k % 2 == 1, bias=n % 2 == 1)
    check(silu_mul_fp8_gemm(gate, up, weight, ws, bias, out_dtype),
          silu_mul_fp8_gemm_ref(gate, up, weight, ws, bias, out_dtype), out_dtype)


@pytest.mark.parametrize("peak_at", [0, BLOCK_H + 5, 3 * BLOCK_H - 1])
def test_the_amax_in_any_slice_sets_the_scale(peak_at):
    gate, up, weight, ws, _ = make_inputs(1, 83, 3 * BLOCK_H, torch.float32, per_channel=True, bias=False,
                                          peak_at=peak_at)
    check(silu_mul_fp8_gemm(gate, up, weight, ws, None, torch.float32),
          silu_mul_fp8_gemm_ref(gate, up, weight, ws, None, torch.float32), torch.float32)


def static_scale(gate, up, fraction=0.7):
    """Below the product's amax / 448: some values saturate at +-448."""
    h = torch.nn.functional.silu(gate.float()) * up.float()
    return (h.abs().max() / FP8_MAX * fraction).reshape(1).clamp_min(1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", SHAPES)
def test_one_row_with_a_static_scale_matches_reference(n, k, dtype):
    gate, up, weight, ws, bias = make_inputs(1, n, k, dtype, per_channel=k % 2 == 0, bias=n % 2 == 0)
    s = static_scale(gate, up)
    want = silu_mul_fp8_gemm_ref(gate, up, weight, ws, bias, torch.float32, s)
    check(silu_mul_fp8_gemm(gate, up, weight, ws, bias, torch.float32, s), want, torch.float32)
    per_token = silu_mul_fp8_gemm_ref(gate, up, weight, ws, bias, torch.float32)
    assert (want - per_token).abs().max() > 1e-3 * want.abs().max()  # the static scale is not the row's own


@pytest.mark.parametrize("m", [0, 2, 17])
def test_other_row_counts_with_a_static_scale(m):
    gate, up, weight, ws, bias = make_inputs(m, 83, 128, torch.float16, per_channel=True, bias=True)
    s = torch.tensor([0.013])
    check(silu_mul_fp8_gemm(gate, up, weight, ws, bias, torch.float32, s),
          silu_mul_fp8_gemm_ref(gate, up, weight, ws, bias, torch.float32, s), torch.float32)


def test_a_row_of_zeros_gives_zeros():
    gate, up, weight, ws, _ = make_inputs(1, 83, 300, torch.bfloat16, per_channel=True, bias=False)
    assert silu_mul_fp8_gemm(torch.zeros_like(gate), up, weight, ws).abs().max() == 0


@pytest.mark.parametrize("m", [0, 2, 17])
def test_other_row_counts_run_the_two_ops(m):
    # fp16: interpreted, silu_mul_quant_fp8 skips bf16's rounding of h (its docstring)
    gate, up, weight, ws, bias = make_inputs(m, 83, 128, torch.float16, per_channel=True, bias=True)
    out = silu_mul_fp8_gemm(gate, up, weight, ws, bias)
    assert out.shape == (m, 83)
    check(out, silu_mul_fp8_gemm_ref(gate, up, weight, ws, bias), torch.bfloat16)


def test_refuses_mismatched_halves_and_block_scales_by_name():
    gate, up, weight, ws, _ = make_inputs(1, 256, 256, torch.bfloat16, per_channel=True, bias=False)
    with pytest.raises(AssertionError, match="gate .* and up"):
        silu_mul_fp8_gemm(gate, up[:, :128], weight, ws)
    with pytest.raises(AssertionError, match="weight_scale .*per-tensor"):
        silu_mul_fp8_gemm(gate, up, weight, torch.rand(2, 2))
    with pytest.raises(AssertionError, match="input_scale: torch.float16 .*expected one fp32"):
        silu_mul_fp8_gemm(gate, up, weight, ws, None, torch.bfloat16, torch.ones(1, dtype=torch.float16))


def test_opcheck():
    gate, up, weight, ws, bias = make_inputs(1, 83, 64, torch.bfloat16, per_channel=True, bias=True)
    # test_schema compares inputs with torch.allclose, not implemented for float8_e4m3fn on CPU
    tests = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.trtllm.silu_mul_fp8_gemm.default, (gate, up, weight, ws, bias, torch.float16),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.trtllm.silu_mul_fp8_gemm.default,
                          (gate, up, weight, ws, bias, torch.float16, torch.tensor([0.02])), test_utils=tests)
