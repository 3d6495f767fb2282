import pytest
import torch

from trtllm.kernels.quantize_fp8 import FP8_DTYPE, quantize_fp8_ref
from trtllm.kernels.rms_norm import rms_norm_ref
from trtllm.kernels.rms_norm_quant_fp8 import (
    fused_add_rms_norm_quant_fp8,
    fused_add_rms_norm_quant_fp8_ref,
    rms_norm_quant_fp8,
    rms_norm_quant_fp8_ref,
)

# fp32/fp16: the kernel computes the reference's values (its e4m3 values may flip by one
# step, 2^-3 relative, at a rounding tie). bf16 runs here in fp32 (registry.interpreter_upcast)
# and skips the norm's two roundings to bf16 (kernels/rms_norm.py's interpreter caveat):
# the amax, so the scale, moves by up to a bf16 ulp or two (2^-8 relative), and an e4m3 value
# by up to one step.
SCALE_RTOL = {torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 2.0 ** -7}
Q_RTOL = 2.0 ** -3
SHAPES = [(1, 7), (7, 83), (3, 769), (2, 5125), (4, 256)]


def _inputs(m, n, dtype):
    x = (torch.randn(m, n) * torch.rand(m, 1) * 4).to(dtype)
    x[:, ::29] *= 8  # outlier columns
    weight = (1 + 0.1 * torch.randn(n)).to(dtype)
    return x, weight


def _close(q, s, q_ref, s_ref, dtype):
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, atol=0, rtol=SCALE_RTOL[dtype])
    torch.testing.assert_close(q.float(), q_ref.float(), atol=0, rtol=Q_RTOL)


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("m,n", SHAPES)
def test_matches_reference(m, n, group_size, dtype, unit_offset):
    x, weight = _inputs(m, n, dtype)
    q, s = rms_norm_quant_fp8(x, weight, 1e-6, group_size, unit_offset)
    _close(q, s, *rms_norm_quant_fp8_ref(x, weight, 1e-6, group_size, unit_offset), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("m,n", SHAPES)
def test_fused_add_matches_reference(m, n, group_size, dtype):
    x, weight = _inputs(m, n, dtype)
    residual = torch.randn(m, n).to(dtype)
    q, s, summed = fused_add_rms_norm_quant_fp8(x, residual, weight, 1e-5, group_size)
    q_ref, s_ref, summed_ref = fused_add_rms_norm_quant_fp8_ref(x, residual, weight, 1e-5, group_size)
    torch.testing.assert_close(summed, summed_ref, atol=0, rtol=0)
    _close(q, s, q_ref, s_ref, dtype)


def test_reference_is_the_unfused_pair():
    x, weight = _inputs(5, 300, torch.bfloat16)
    q, s = rms_norm_quant_fp8_ref(x, weight, 1e-6, 128)
    q2, s2 = quantize_fp8_ref(rms_norm_ref(x, weight, 1e-6), 128)
    assert torch.equal(q.float(), q2.float()) and torch.equal(s, s2)


def test_row_stride():
    wide = torch.randn(4, 600, dtype=torch.float16)
    x, weight = wide[:, 300:], (1 + 0.1 * torch.randn(300)).half()
    _close(*rms_norm_quant_fp8(x, weight, 1e-6, 128), *rms_norm_quant_fp8_ref(x, weight, 1e-6, 128),
           torch.float16)


def test_rejects_bad_input():
    x, weight = _inputs(2, 64, torch.float16)
    with pytest.raises(AssertionError, match="weight .32,."):
        rms_norm_quant_fp8(x, weight[:32], 1e-6)
    with pytest.raises(AssertionError, match="residual"):
        fused_add_rms_norm_quant_fp8(x, x.float(), weight, 1e-6)
    with pytest.raises(AssertionError, match="group_size 48"):
        rms_norm_quant_fp8(x, weight, 1e-6, 48)
    with pytest.raises(AssertionError, match="x: dtype"):
        rms_norm_quant_fp8(x.to(FP8_DTYPE), weight, 1e-6)


# opcheck's test_schema compares outputs with torch.allclose: no fp8 CPU kernel (torch 2.13).
OPCHECK_TESTS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def test_opcheck():
    x, weight = _inputs(3, 200, torch.bfloat16)
    torch.library.opcheck(torch.ops.trtllm.rms_norm_quant_fp8.default, (x, weight, 1e-6, 128),
                          test_utils=OPCHECK_TESTS)
    torch.library.opcheck(torch.ops.trtllm.fused_add_rms_norm_quant_fp8.default,
                          (x, torch.randn_like(x), weight, 1e-6), test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n", SHAPES)
def test_static_input_scale_matches_reference(m, n, dtype):
    # a checkpoint's calibrated per-tensor scale (some values saturate at 448): no amax is taken
    x, weight = _inputs(m, n, dtype)
    residual = torch.randn(m, n).to(dtype)
    input_scale = torch.rand(1) * 0.004 + 0.002
    q, s = rms_norm_quant_fp8(x, weight, 1e-6, None, False, input_scale)
    q_ref, s_ref = rms_norm_quant_fp8_ref(x, weight, 1e-6, None, False, input_scale)
    assert torch.equal(s, input_scale.expand(m, 1)) and torch.equal(s_ref, s)
    _close(q, s, q_ref, s_ref, dtype)
    q, s, summed = fused_add_rms_norm_quant_fp8(x, residual, weight, 1e-5, None, True, input_scale)
    q_ref, s_ref, summed_ref = fused_add_rms_norm_quant_fp8_ref(x, residual, weight, 1e-5, None, True, input_scale)
    torch.testing.assert_close(summed, summed_ref, atol=0, rtol=0)
    assert torch.equal(s, s_ref)
    _close(q, s, q_ref, s_ref, dtype)


def test_static_reference_is_the_unfused_pair():
    from trtllm.kernels.quantize_fp8_static import quantize_fp8_static_ref

    x, weight = _inputs(5, 300, torch.bfloat16)
    input_scale = torch.tensor([0.003])
    q, _ = rms_norm_quant_fp8_ref(x, weight, 1e-6, None, False, input_scale)
    assert torch.equal(q.float(), quantize_fp8_static_ref(rms_norm_ref(x, weight, 1e-6), input_scale).float())


def test_static_input_scale_refuses_groups_and_other_scales_by_name():
    x, weight = _inputs(2, 256, torch.float16)
    with pytest.raises(AssertionError, match="group_size 128 with a static input_scale"):
        rms_norm_quant_fp8(x, weight, 1e-6, 128, False, torch.tensor([0.01]))
    with pytest.raises(AssertionError, match="input_scale: torch.float32 .2,."):
        rms_norm_quant_fp8(x, weight, 1e-6, None, False, torch.tensor([0.01, 0.02]))


def test_static_scale_output_is_a_copy_on_the_reference_path(monkeypatch):
    # CPU without the interpreter runs the reference: for one row its scale output must not
    # alias input_scale (torch refuses an op output that aliases an input)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight = _inputs(1, 64, torch.float32)
    scale = torch.tensor([0.01])
    q, s = rms_norm_quant_fp8(x, weight, 1e-6, None, False, scale)
    assert s.data_ptr() != scale.data_ptr() and torch.equal(s, scale.reshape(1, 1))


def test_opcheck_static():
    x, weight = _inputs(3, 200, torch.bfloat16)
    scale = torch.tensor([0.01])
    torch.library.opcheck(torch.ops.trtllm.rms_norm_quant_fp8.default, (x, weight, 1e-6, None, False, scale),
                          test_utils=OPCHECK_TESTS)
    torch.library.opcheck(torch.ops.trtllm.fused_add_rms_norm_quant_fp8.default,
                          (x, torch.randn_like(x), weight, 1e-6, None, False, scale), test_utils=OPCHECK_TESTS)
