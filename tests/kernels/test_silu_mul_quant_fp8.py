import pytest
import torch

from trtllm.kernels.quantize_fp8 import FP8_DTYPE, quantize_fp8_ref
from trtllm.kernels.silu_mul import silu_mul_ref
from trtllm.kernels.silu_mul_quant_fp8 import silu_mul_quant_fp8, silu_mul_quant_fp8_ref

# fp32/fp16: the kernel computes the reference's values up to tl.sigmoid's last fp32 bit
# (its e4m3 values may flip by one step, 2^-3 relative, at a rounding tie). bf16 runs here
# in fp32 (registry.interpreter_upcast) and skips the product's rounding to bf16: the amax,
# so the scale, moves by up to a bf16 ulp (2^-8 relative), and an e4m3 value by one step:
# 2^-3 relative for normal values, 2^-9 (the subnormal spacing) near zero.
SCALE_RTOL = {torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 2.0 ** -7}
Q_RTOL, Q_ATOL = 2.0 ** -3, 2.0 ** -9
SHAPES = [(1, 7), (7, 83), (3, 769), (2, 5125), (5, 256)]


def _inputs(m, n, dtype, fused=True):
    """gate and up as the two halves of one [M, 2N] gate_up output (row stride 2N), fresh
    random values with outlier columns."""
    gate_up = torch.randn(m, 2 * n) * torch.rand(m, 1) * 3
    gate_up[:, ::31] *= 6
    gate_up = gate_up.to(dtype)
    if not fused:
        return gate_up[:, :n].contiguous(), gate_up[:, n:].contiguous()
    return gate_up[:, :n], gate_up[:, n:]


def _close(q, s, q_ref, s_ref, dtype):
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == s_ref.shape
    assert q.is_contiguous() and s.is_contiguous()
    torch.testing.assert_close(s, s_ref, atol=0, rtol=SCALE_RTOL[dtype])
    torch.testing.assert_close(q.float(), q_ref.float(), atol=Q_ATOL, rtol=Q_RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("m,n", SHAPES)
def test_matches_reference(m, n, group_size, dtype):
    gate, up = _inputs(m, n, dtype)
    _close(*silu_mul_quant_fp8(gate, up, group_size), *silu_mul_quant_fp8_ref(gate, up, group_size), dtype)


def test_contiguous_halves_and_group_16():
    gate, up = _inputs(4, 200, torch.float16, fused=False)
    _close(*silu_mul_quant_fp8(gate, up, 16), *silu_mul_quant_fp8_ref(gate, up, 16), torch.float16)


def test_reference_is_the_unfused_pair():
    gate, up = _inputs(5, 300, torch.bfloat16)
    q, s = silu_mul_quant_fp8_ref(gate, up, 128)
    q2, s2 = quantize_fp8_ref(silu_mul_ref(gate, up), 128)
    assert torch.equal(q.float(), q2.float()) and torch.equal(s, s2)


def test_zero_rows_and_empty():
    gate, up = _inputs(3, 64, torch.float16)
    gate[1] = 0  # a row of zeros: the scale MIN_AMAX / 448, the values zeros, no NaN
    q, s = silu_mul_quant_fp8(gate, up)
    assert torch.isfinite(s).all() and (q[1].float() == 0).all()
    _close(q, s, *silu_mul_quant_fp8_ref(gate, up), torch.float16)
    q, s = silu_mul_quant_fp8(*_inputs(0, 64, torch.float16))
    assert q.shape == (0, 64) and s.shape == (0, 1)


def test_rejects_bad_input():
    gate, up = _inputs(2, 64, torch.float16)
    with pytest.raises(AssertionError, match="up: dtype"):
        silu_mul_quant_fp8(gate, up.float())
    with pytest.raises(AssertionError, match="one shape"):
        silu_mul_quant_fp8(gate, up[:, :32])
    with pytest.raises(AssertionError, match="group_size 48"):
        silu_mul_quant_fp8(gate, up, 48)
    with pytest.raises(AssertionError, match="gate: dtype"):
        silu_mul_quant_fp8(gate.int(), up.int())
    with pytest.raises(AssertionError, match="last dim must be contiguous"):
        silu_mul_quant_fp8(gate.t().contiguous().t(), up)


# opcheck's test_schema compares inputs with torch.allclose (fine here: the inputs are
# float), but the outputs' fp8 comparison is unimplemented on CPU in torch 2.13, as in
# tests/kernels/test_fp8_gemm.py.
OPCHECK_TESTS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("group_size", [None, 128])
def test_opcheck(group_size):
    gate, up = _inputs(3, 300, torch.float16)
    torch.library.opcheck(torch.ops.trtllm.silu_mul_quant_fp8.default, (gate, up, group_size),
                          test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n", SHAPES + [(2, 2049)])
def test_static_input_scale_matches_reference(m, n, dtype):
    # a checkpoint's calibrated per-tensor scale (some values saturate at 448), no amax taken;
    # the programs tile the row (2,049: three 1,024-wide column blocks, the last of one)
    gate, up = _inputs(m, n, dtype)
    input_scale = torch.rand(1) * 0.01 + 0.004
    q, s = silu_mul_quant_fp8(gate, up, None, input_scale)
    q_ref, s_ref = silu_mul_quant_fp8_ref(gate, up, None, input_scale)
    assert torch.equal(s, input_scale.expand(m, 1)) and torch.equal(s_ref, s)
    _close(q, s, q_ref, s_ref, dtype)


def test_static_reference_is_the_unfused_pair_and_refuses_groups():
    from trtllm.kernels.quantize_fp8_static import quantize_fp8_static_ref

    gate, up = _inputs(4, 300, torch.bfloat16)
    scale = torch.tensor([0.01])
    q, _ = silu_mul_quant_fp8_ref(gate, up, None, scale)
    assert torch.equal(q.float(), quantize_fp8_static_ref(silu_mul_ref(gate, up), scale).float())
    with pytest.raises(AssertionError, match="group_size 128 with a static input_scale"):
        silu_mul_quant_fp8(gate, up, 128, scale)


def test_opcheck_static():
    gate, up = _inputs(3, 300, torch.float16)
    torch.library.opcheck(torch.ops.trtllm.silu_mul_quant_fp8.default, (gate, up, None, torch.tensor([0.01])),
                          test_utils=OPCHECK_TESTS)
