import pytest
import torch

from trtllm.kernels.quantize_fp8 import FP8_DTYPE, FP8_MAX
from trtllm.kernels.quantize_fp8_static import quantize_fp8_static, quantize_fp8_static_ref

# (M, K): odd K (masked column tails), K over several 1,024-wide column blocks
SHAPES = [(1, 7), (3, 83), (7, 769), (2, 5125), (5, 2048)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", SHAPES)
def test_matches_the_reference_bit_for_bit(m, k, dtype):
    x = (torch.randn(m, k) * torch.rand(m, 1) * 8).to(dtype)
    scale = torch.rand(1) * 0.02 + 0.004  # fresh; some |x / scale| saturate at 448
    got = quantize_fp8_static(x, scale)
    want = quantize_fp8_static_ref(x, scale)
    assert got.dtype == FP8_DTYPE and got.shape == (m, k)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert (got.float().abs() == FP8_MAX).any() and (got.float().abs() < FP8_MAX).any()


def test_takes_a_row_stride_and_empty_shapes():
    wide = torch.randn(4, 300).to(torch.bfloat16)
    scale = torch.tensor([0.01])
    assert torch.equal(quantize_fp8_static(wide[:, :83], scale).view(torch.uint8),
                       quantize_fp8_static_ref(wide[:, :83].contiguous(), scale).view(torch.uint8))
    assert quantize_fp8_static(torch.empty(0, 83), scale).shape == (0, 83)
    assert quantize_fp8_static(torch.empty(3, 0), scale).shape == (3, 0)


def test_refuses_a_scale_that_is_not_one_fp32_by_name():
    x = torch.randn(2, 64)
    with pytest.raises(AssertionError, match="scale: .* expected one fp32 per-tensor scale"):
        quantize_fp8_static(x, torch.tensor([0.01, 0.02]))
    with pytest.raises(AssertionError, match="scale: torch.float16"):
        quantize_fp8_static(x, torch.tensor([0.01], dtype=torch.float16))


def test_opcheck():
    x = torch.randn(3, 83).to(torch.bfloat16)
    # test_schema compares outputs with torch.allclose, not implemented for float8_e4m3fn on CPU
    tests = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.trtllm.quantize_fp8_static.default, (x, torch.tensor([0.01])), test_utils=tests)
