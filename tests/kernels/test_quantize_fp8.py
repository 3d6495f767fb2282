import pytest
import torch

from trtllm.kernels.fp8_gemm import fp8_gemm
from trtllm.kernels.quantize_fp8 import FP8_DTYPE, FP8_MAX, MIN_AMAX, quantize_fp8, quantize_fp8_ref

# The kernel's scales are the reference's bit for bit (same amax, same division); its e4m3
# values may differ from the reference's by one e4m3 step (2^-3 relative) where the fp32
# quotient sits at a rounding tie. bf16 input runs here in fp32 (registry.interpreter_upcast),
# exactly as given.
SCALE_TOL = dict(atol=0, rtol=0)
Q_RTOL = 2.0 ** -3
SHAPES = [(1, 7), (7, 83), (83, 769), (5, 5125), (3, 128), (2, 256)]

# The quantize -> GEMM chain against the unquantized matmul (fp32 of the bf16 inputs), as
# ||y - y_bf16|| / ||y_bf16||: e4m3 keeps 3 mantissa bits (relative rounding error <= 2^-4
# per element, ~2^-4/sqrt(3) rms for uniform errors), and the errors of x and w add in
# quadrature (this test's shapes, seed 0: 0.032-0.037 for every granularity); 0.08
# allowed. Block scales fit outliers at least as well as one per-tensor scale (10% slack).
CHAIN_REL_ERR = 0.08


def _x(m, k, dtype):
    x = torch.randn(m, k) * torch.rand(m, 1) * 10  # rows of different magnitudes
    x[:, ::37] *= 20                                # a few outlier columns
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 128, 16])
@pytest.mark.parametrize("m,k", SHAPES)
def test_matches_reference(m, k, group_size, dtype):
    x = _x(m, k, dtype)
    q, scale = quantize_fp8(x, group_size)
    q_ref, scale_ref = quantize_fp8_ref(x, group_size)
    n_groups = 1 if group_size is None else -(-k // group_size)
    assert q.dtype == FP8_DTYPE and q.shape == (m, k) and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (m, n_groups)
    torch.testing.assert_close(scale, scale_ref, **SCALE_TOL)
    torch.testing.assert_close(q.float(), q_ref.float(), atol=0, rtol=Q_RTOL)
    # and it is a quantization: |x - x_fp8 * scale| <= half an e4m3 step of each group's range
    g = k if group_size is None else group_size
    dq = q.float() * scale.repeat_interleave(g, dim=1)[:, :k]
    assert (q.float().abs() <= FP8_MAX).all()
    assert ((dq - x.float()).abs() <= x.float().abs() * 2.0 ** -4 + scale.amax() * 2.0 ** -9).all()


def test_zero_group_and_row_stride():
    x = torch.randn(4, 2 * 300)[:, 300:]  # row stride 600
    x[1] = 0.0
    x[2, 128:256] = 0.0
    q, scale = quantize_fp8(x, 128)
    assert torch.isfinite(q.float()).all() and (q[1].float() == 0).all() and (q[2, 128:256].float() == 0).all()
    assert scale[1].eq(MIN_AMAX / FP8_MAX).all() and scale[2, 1] == MIN_AMAX / FP8_MAX
    q_ref, scale_ref = quantize_fp8_ref(x, 128)
    torch.testing.assert_close(scale, scale_ref, **SCALE_TOL)
    torch.testing.assert_close(q.float(), q_ref.float(), atol=0, rtol=Q_RTOL)


def _rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("m,n,k", [(3, 83, 769), (40, 130, 257)])
def test_quantize_then_gemm_near_bf16_matmul(m, n, k):
    """The chain a FP8 linear runs, each granularity, against the bf16 model's own matmul."""
    x = _x(m, k, torch.bfloat16)
    w = (torch.randn(n, k) / k ** 0.5).to(torch.bfloat16)
    y_bf16 = x.float() @ w.float().t()
    # weights: per-tensor, per-channel, 128x128 blocks (offline quantization, in torch)
    w_amax = w.float().abs().amax()
    w_tensor = ((w.float() / (w_amax / FP8_MAX)).to(FP8_DTYPE), (w_amax / FP8_MAX).reshape(1))
    w_ch_scale = w.float().abs().amax(1, keepdim=True) / FP8_MAX
    w_channel = ((w.float() / w_ch_scale).to(FP8_DTYPE), w_ch_scale)
    # a 128x128 block is the transposed layout's 1x128 group, block-wise: quantize blocks directly
    nb, kb = -(-n // 128), -(-k // 128)
    wp = torch.nn.functional.pad(w.float(), (0, kb * 128 - k, 0, nb * 128 - n)).view(nb, 128, kb, 128)
    w_blk_scale = wp.abs().amax(dim=(1, 3)).clamp(min=MIN_AMAX) / FP8_MAX  # [nb, kb]
    w_blk = (wp / w_blk_scale[:, None, :, None]).view(nb * 128, kb * 128)[:n, :k].to(FP8_DTYPE)

    x_tok, xs_tok = quantize_fp8(x)
    x_grp, xs_grp = quantize_fp8(x, 128)
    errs = {
        "tensor": _rel_err(fp8_gemm(x_tok, w_tensor[0], xs_tok, w_tensor[1]), y_bf16),
        "token_channel": _rel_err(fp8_gemm(x_tok, *w_channel[:1], xs_tok, w_channel[1]), y_bf16),
        "block": _rel_err(fp8_gemm(x_grp, w_blk, xs_grp, w_blk_scale.contiguous()), y_bf16),
    }
    assert all(e < CHAIN_REL_ERR for e in errs.values()), errs
    assert errs["block"] <= errs["tensor"] * 1.1, errs


def test_rejects_bad_input():
    with pytest.raises(AssertionError, match="x: dtype"):
        quantize_fp8(torch.randn(2, 8).to(FP8_DTYPE))
    with pytest.raises(AssertionError, match="group_size 100"):
        quantize_fp8(torch.randn(2, 300), 100)
    with pytest.raises(AssertionError, match="not an .M, K. matrix"):
        quantize_fp8(torch.randn(2, 3, 8))


def test_reference_without_interpreter(monkeypatch):
    x = _x(3, 200, torch.bfloat16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, s = quantize_fp8(x, 128)
    q_ref, s_ref = quantize_fp8_ref(x, 128)
    assert torch.equal(q.float(), q_ref.float()) and torch.equal(s, s_ref)


# opcheck's test_schema compares outputs with torch.allclose: no fp8 CPU kernel (torch 2.13).
OPCHECK_TESTS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def test_opcheck():
    op = torch.ops.trtllm.quantize_fp8.default
    torch.library.opcheck(op, (_x(3, 83, torch.bfloat16),), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(op, (_x(5, 200, torch.float16), 128), test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("width", [1, 7, 83, 769, 4096, 5120, 5125, 14336, 65536])
def test_row_num_warps_is_a_power_of_two(width):
    # Llama-3.1-8B's 14,336-wide MLP row gave 14 warps once: Triton refused the launch on the GPU only.
    from trtllm.kernels.registry import row_num_warps

    for per_warp, lo in ((1024, 1), (512, 4)):
        warps = row_num_warps(width, per_warp, lo=lo)
        assert lo <= warps <= 16 and warps & (warps - 1) == 0, (width, per_warp, warps)
