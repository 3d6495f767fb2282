import pytest
import torch

from trtllm.kernels.fp8_gemm import (
    FP8_DTYPE,
    FP8_MAX,
    _scaled_mm_serves,
    fp8_gemm,
    fp8_gemm_ref,
    fp8_gemm_scaled_mm,
    fp8_gemm_tiles,
    fp8_gemv,
)
from trtllm.kernels.fp8_gemm_configs import Fp8GemmConfig, Fp8GemvConfig
from trtllm.kernels.quantize_fp8 import require_fp8_gpu

# Kernel vs reference on the same fp8 inputs: the fp8 x fp8 products are exact in fp32, so
# they differ by the order of the fp32 sums (and where the scales multiply: once at the end
# vs on the dequantized operands), plus a 1-ulp rounding flip of a 16-bit output.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
# Small tiles: the interpreter runs the programs one after another.
TILES = Fp8GemmConfig(block_m=32, block_n=64, block_k=64, group_m=2, num_warps=4, num_stages=2)
TILES_K128 = Fp8GemmConfig(block_m=16, block_n=32, block_k=128, group_m=4, num_warps=4, num_stages=2)
GEMV = Fp8GemvConfig(block_n=64, block_k=64, num_warps=4, num_stages=2)
GEMV_K256 = Fp8GemvConfig(block_n=32, block_k=256, num_warps=4, num_stages=2)
# Odd M, N, K (masked tails, partial 128-blocks), and K a multiple of BLOCK_K (no K mask).
SHAPES = [(7, 83, 769), (83, 7, 257), (17, 769, 83), (33, 130, 256), (1, 7, 5125)]
GEMV_SHAPES = [(1, 83, 769), (3, 769, 83), (7, 130, 256), (16, 7, 5125), (2, 83, 128)]
GRANULARITIES = ["tensor", "token_channel", "tensor_channel", "token_tensor", "block"]


def cdiv(a, b):
    return -(-a // b)


def make_scales(m, n, k, granularity):
    """Fresh positive scales of the granularity's shapes (never ones)."""
    def rand(*shape):
        return torch.rand(*shape) * 0.02 + 0.005
    x_shape, w_shape = {
        "tensor": ((1,), (1,)),
        "token_channel": ((m, 1), (n, 1)),
        "tensor_channel": ((1,), (n, 1)),
        "token_tensor": ((m, 1), (1,)),
        "block": ((m, cdiv(k, 128)), (cdiv(n, 128), cdiv(k, 128))),
    }[granularity]
    return rand(*x_shape), rand(*w_shape)


def make_inputs(m, n, k, granularity, bias=True):
    x = (torch.randn(m, k) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    weight = (torch.randn(n, k) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    x_scale, w_scale = make_scales(m, n, k, granularity)
    b = torch.randn(n) if bias else None
    return x, weight, x_scale, w_scale, b


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_tiles_match_reference(m, n, k, granularity, out_dtype):
    x, weight, xs, ws, bias = make_inputs(m, n, k, granularity, bias=m % 2 == 1)
    config = TILES_K128 if k % 2 else TILES
    out = fp8_gemm_tiles(x, weight, xs, ws, bias, torch.empty(m, n, dtype=out_dtype), config)
    torch.testing.assert_close(out, fp8_gemm_ref(x, weight, xs, ws, bias, out_dtype), **TOLERANCES[out_dtype])


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("m,n,k", GEMV_SHAPES)
def test_gemv_matches_reference(m, n, k, granularity, out_dtype):
    x, weight, xs, ws, bias = make_inputs(m, n, k, granularity, bias=n % 2 == 1)
    config = GEMV_K256 if granularity != "block" and k % 2 == 0 else GEMV
    out = fp8_gemv(x, weight, xs, ws, bias, torch.empty(m, n, dtype=out_dtype), config)
    torch.testing.assert_close(out, fp8_gemm_ref(x, weight, xs, ws, bias, out_dtype), **TOLERANCES[out_dtype])


@pytest.mark.parametrize("m", [1, 16, 17, 70])
def test_op_default_configs(m):
    # The op's own choice: the GEMV for M <= 16, 128-wide tiles above; odd N and K.
    for granularity in ("token_channel", "block"):
        x, weight, xs, ws, bias = make_inputs(m, 83, 257, granularity)
        out = fp8_gemm(x, weight, xs, ws, bias)
        assert out.dtype == torch.bfloat16 and out.shape == (m, 83) and out.is_contiguous()
        torch.testing.assert_close(out, fp8_gemm_ref(x, weight, xs, ws, bias), **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("granularity", ["tensor", "token_channel", "tensor_channel", "token_tensor"])
@pytest.mark.parametrize("m,n,k", [(17, 48, 64), (83, 96, 272)])
def test_scaled_mm_path_takes_every_scale_mix(m, n, k, granularity):
    # The sm_90 path above the GEMV's rows: torch._scaled_mm (its CPU build here) with a
    # per-tensor side broadcast to rows; a bias in the output dtype rides in its epilogue.
    x, weight, xs, ws, bias = make_inputs(m, n, k, granularity, bias=m % 2 == 1)
    bias = None if bias is None else bias.bfloat16()
    out = fp8_gemm_scaled_mm(x, weight, xs, ws, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    torch.testing.assert_close(out, fp8_gemm_ref(x, weight, xs, ws, bias), **TOLERANCES[torch.bfloat16])
    # served only on a CUDA sm_90 device (not here), never for block scales or fp32 outputs
    assert not _scaled_mm_serves(x, weight, bias, torch.bfloat16, block=False)
    with pytest.raises(AssertionError, match="no block scales"):
        fp8_gemm_scaled_mm(*make_inputs(m, n, k, "block", bias=False)[:4])


def test_row_stride_and_empty():
    k = 200
    wide = (torch.randn(5, 2 * k) * 50).to(FP8_DTYPE)
    x = wide[:, k:]  # row stride 2K, last dim contiguous
    weight = (torch.randn(83, k) * 50).to(FP8_DTYPE)
    xs, ws = make_scales(5, 83, k, "token_channel")
    torch.testing.assert_close(fp8_gemm(x, weight, xs, ws, out_dtype=torch.float32),
                               fp8_gemm_ref(x, weight, xs, ws, out_dtype=torch.float32),
                               **TOLERANCES[torch.float32])
    empty = torch.empty(0, k, dtype=FP8_DTYPE)
    assert fp8_gemm(empty, weight, torch.ones(0, 1), ws).shape == (0, 83)


def test_reference_is_dequantize_then_matmul():
    """The semantics of record spelled out once for block scales: each 128x128 weight block and
    each 1x128 activation group multiplied by its own scale."""
    m, n, k = 3, 130, 200
    x, weight, xs, ws, _ = make_inputs(m, n, k, "block", bias=False)
    xf = x.float().clone()
    wf = weight.float().clone()
    for i in range(m):
        for g in range(cdiv(k, 128)):
            xf[i, g * 128:(g + 1) * 128] *= xs[i, g]
    for bn in range(cdiv(n, 128)):
        for bk in range(cdiv(k, 128)):
            wf[bn * 128:(bn + 1) * 128, bk * 128:(bk + 1) * 128] *= ws[bn, bk]
    torch.testing.assert_close(fp8_gemm_ref(x, weight, xs, ws, out_dtype=torch.float32), xf @ wf.t(),
                               atol=1e-4, rtol=1e-5)


def test_rejects_bad_input():
    m, n, k = 4, 83, 200
    x, weight, xs, ws, _ = make_inputs(m, n, k, "token_channel", bias=False)
    with pytest.raises(AssertionError, match="x: dtype"):
        fp8_gemm(x.float(), weight, xs, ws)
    with pytest.raises(AssertionError, match="weight: dtype"):
        fp8_gemm(x, weight.to(torch.float8_e5m2), xs, ws)
    with pytest.raises(AssertionError, match="weight: strides"):
        fp8_gemm(x, torch.empty(k, n, dtype=FP8_DTYPE).t(), xs, ws)
    with pytest.raises(AssertionError, match="does not match"):
        fp8_gemm(x, weight[:, :100].contiguous(), xs, ws)
    with pytest.raises(AssertionError, match="weight_scale .82, 1."):
        fp8_gemm(x, weight, xs, ws[:82])
    with pytest.raises(AssertionError, match="x_scale .3, 1."):
        fp8_gemm(x, weight, xs[:3], ws)
    with pytest.raises(AssertionError, match="x_scale: dtype"):
        fp8_gemm(x, weight, xs.half(), ws)
    with pytest.raises(AssertionError, match="weight_scale: not contiguous"):
        fp8_gemm(x, weight, xs, torch.rand(n, 2)[:, :1])
    # block weight scales with per-token activation scales: named, not mixed silently
    with pytest.raises(AssertionError, match="per-token-group"):
        fp8_gemm(x, weight, xs, torch.rand(1, 2))
    with pytest.raises(AssertionError, match="out_dtype"):
        fp8_gemm(x, weight, xs, ws, out_dtype=torch.int32)
    with pytest.raises(AssertionError, match="bias"):
        fp8_gemm(x, weight, xs, ws, torch.randn(n + 1))
    with pytest.raises(AssertionError, match="block_k 256 must divide"):
        bx, bw, bxs, bws, _ = make_inputs(m, n, k, "block", bias=False)
        fp8_gemv(bx, bw, bxs, bws, None, torch.empty(m, n), GEMV_K256)
    with pytest.raises(AssertionError, match="at most 16"):
        fp8_gemv(*make_inputs(17, n, k, "tensor")[:4], None, torch.empty(17, n), GEMV)


def test_pre_sm89_gpu_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(RuntimeError, match="sm_89.*A100.*sm_80"):
        require_fp8_gpu(torch.device("cuda", 0), "fp8_gemm")
    require_fp8_gpu(torch.device("cpu"), "fp8_gemm")  # the interpreter / reference: no refusal


def test_reference_without_interpreter(monkeypatch):
    x, weight, xs, ws, bias = make_inputs(3, 83, 64, "tensor")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor then takes the reference
    assert torch.equal(fp8_gemm(x, weight, xs, ws, bias), fp8_gemm_ref(x, weight, xs, ws, bias))


# opcheck's test_schema compares inputs before and after with torch.allclose, which torch
# (2.13, CPU) does not implement for float8_e4m3fn ("mul_cpu_reduced_float"); the rest run.
OPCHECK_TESTS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def test_opcheck():
    op = torch.ops.trtllm.fp8_gemm.default
    x, weight, xs, ws, bias = make_inputs(3, 83, 64, "token_channel")
    torch.library.opcheck(op, (x, weight, xs, ws, bias, torch.float16), test_utils=OPCHECK_TESTS)
    x, weight, xs, ws, _ = make_inputs(20, 83, 200, "block")
    torch.library.opcheck(op, (x, weight, xs, ws), test_utils=OPCHECK_TESTS)
