"""Per-token FP8 quantization of x and the FP8 GEMM, in one op: the decode GEMV quantizes x itself.

    quantize_fp8_gemm(x, w, sw, bias, out_dtype)
        = fp8_gemm(*quantize_fp8(x, None), w, sw, bias, out_dtype)
    i.e. scale[m] = max(amax(|x[m, :]|), MIN_AMAX) / 448
         y[m, n]  = (sum_k e4m3(x[m, k] / scale[m]) * w[n, k]) * scale[m] * sw[n] (+ bias[n])

Shapes: x [M, K] (fp32/fp16/bf16, last dim contiguous, any row stride); w [N, K] float8_e4m3fn
contiguous; sw per-tensor [1] or per-channel [N, 1] fp32 (no block scales: those quantize x
in 1x128 groups, which this op does not do); bias [N] or None. Output [M, N] in out_dtype,
contiguous. The formulas are kernels/quantize_fp8.py's and kernels/fp8_gemm.py's.

Why: at decode every FP8 linear whose input no fused producer quantizes (Llama's o_proj, whose
input is attention's output) ran a one-program quantize kernel (a launch of ~2.4 us on the
H200 for a row of 4,096) before the weight-streaming GEMV. Here, for M <= FP8_GEMV_MAX_M,
each GEMV program first walks x once for the rows' amax (8 KB of bf16 a row for K = 4,096,
read from L2 by each of the ~128 programs), then streams its weight rows, quantizing each x
tile as kernels/quantize_fp8.py's kernel does (div_rn, clamp, round-to-nearest-even cast),
so the fp8 x it multiplies is the unfused path's, bit for bit. More rows run the two ops.

Interpreted (TRITON_INTERPRET=1), the fp8 tensors are fp32 copies (registry.interpreter_upcast)
and the cast to e4m3 is `round_to_e4m3` in fp32 bit arithmetic: the interpreter's own fp32 ->
fp8 cast rounds values near a power of two down a binade (126.3 came back 64, torch: 128).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtllm.kernels.fp8_gemm import (
    FP8_DTYPE,
    FP8_GEMV_MAX_M,
    FP8_MAX,
    FP8_PROMOTE_K,
    fp8_gemm_check,
    fp8_gemm_ref,
    fp8_gemm_triton,
)
from trtllm.kernels.fp8_gemm_configs import Fp8GemvConfig, default_gemv_config
from trtllm.kernels.quantize_fp8 import MIN_AMAX, quantize_fp8_ref, quantize_fp8_triton, require_fp8_gpu
from trtllm.kernels.registry import interpreter_upcast, register_op, triton_interpreter_on

_IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
           out_dtype: torch.dtype) -> None:
    assert x.dtype in _IN_DTYPES, f"x: dtype {x.dtype}, expected one of {_IN_DTYPES}"
    assert x.dim() == 2, f"x: {tuple(x.shape)} is not an [M, K] matrix"
    assert weight.dim() == 2 and weight.shape[1] == x.shape[1], \
        f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}"
    assert tuple(weight_scale.shape) in ((1,), (weight.shape[0], 1)), (
        f"weight_scale {tuple(weight_scale.shape)}: quantize_fp8_gemm takes per-tensor (1,) or "
        f"per-channel ({weight.shape[0]}, 1) weight scales (block weights quantize x in groups)")
    # the rest of fp8_gemm's checks, on the operands it would see (x quantized per token)
    m, k = x.shape
    fp8_gemm_check(torch.empty((), dtype=FP8_DTYPE, device=x.device).expand(m, k), weight,
                   torch.empty((m, 1), dtype=torch.float32, device=x.device), weight_scale, bias, out_dtype)


def quantize_fp8_gemm_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    _check(x, weight, weight_scale, bias, out_dtype)
    xq, xs = quantize_fp8_ref(x, None)
    return fp8_gemm_ref(xq, weight, xs, weight_scale, bias, out_dtype)


@triton.jit
def round_to_e4m3(v):
    """fp32 v in [-448, 448] -> the nearest e4m3 value (ties to even), as fp32: normals keep
    3 mantissa bits (round the 20 below), subnormals (|v| < 2^-6) step by 2^-9 (adding 2^14
    rounds to a multiple of 2^(14 - 23))."""
    bits = v.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    sub = (tl.abs(v) + 16384.0) - 16384.0
    return tl.where(tl.abs(v) < 0.015625, tl.where(v < 0, -sub, sub), normal)


@triton.jit
def quantize_to_e4m3(x, scale, rscale, FP8_MAX: tl.constexpr, DIVIDE: tl.constexpr, EMULATE_E4M3: tl.constexpr):
    """fp32 x / scale (rscale = 1 / scale, rounded), clamped to +-448 and rounded to e4m3, as fp32.

    DIVIDE: the IEEE quotient by div_rn (quantize_fp8's); else the same quotient from the
    reciprocal and one exact correction (Markstein: q = x * rscale, e = x - q * scale exact by
    fma, q + e * rscale rounded), 3 instructions where div_rn is ~10 and a slow path for zeros.
    x * rscale alone is 1 ulp off at times, and bf16 x often lands an e4m3 tie: 8 of 769
    elements of a row flipped on the CPU."""
    if DIVIDE or EMULATE_E4M3:  # the interpreter's fma is not fused: divide there
        q = tl.math.div_rn(x, scale)
    else:
        q = x * rscale
        q = tl.fma(tl.fma(-q, scale, x), rscale, q)
    q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
    if EMULATE_E4M3:
        return round_to_e4m3(q)
    return q.to(tl.float8e4nv).to(tl.float32)


@triton.jit
def _quantize_fp8_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K,
    x_row_stride, w_row_stride, y_row_stride, ws_row_stride,
    HAS_BIAS: tl.constexpr,
    EMULATE_E4M3: tl.constexpr,    # interpreted: round x to e4m3 in fp32 (see the docstring)
    DIVIDE: tl.constexpr,
    USE_DOT: tl.constexpr,
    MIN_AMAX: tl.constexpr, FP8_MAX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MAX_IMPRECISE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,         # rows padded to 16 (the smallest tl.dot side)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # Grid: (cdiv(N, BLOCK_N),). Each program finds every row's scale, then streams W[rows, :]
    # once for all M rows, as fp8_gemm's _fp8_gemv_kernel does.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m[:, None] < M
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * x_row_stride + offs_k[None, :]

    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=m_mask & ((k0 + offs_k) < K)[None, :], other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    # div_rn: the IEEE quotient quantize_fp8 computes
    scale = tl.math.div_rn(tl.maximum(amax, MIN_AMAX), tl.full([BLOCK_M], FP8_MAX, tl.float32))  # [BLOCK_M]
    rscale = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), scale)

    w_ptrs = w_ptr + rows_n[:, None] * w_row_stride + offs_k[None, :]
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_mask, other=0.0)
        else:
            k_mask = (k0 + offs_k) < K
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_mask & k_mask[None, :], other=0.0)
        xq = quantize_to_e4m3(x.to(tl.float32), scale[:, None], rscale[:, None], FP8_MAX, DIVIDE,
                              EMULATE_E4M3)  # [BLOCK_M, BLOCK_K]
        if USE_DOT:
            acc = tl.dot(w, tl.trans(xq.to(w.dtype)), acc, input_precision=DOT_PRECISION,
                         max_num_imprecise_acc=MAX_IMPRECISE_ACC)
        else:  # one row (BLOCK_M 1): products on the CUDA cores, reduced once at the end
            acc2 += w.to(tl.float32) * xq
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if not USE_DOT:
        acc = tl.sum(acc2, axis=1)[:, None]  # [BLOCK_N, 1]

    ws = tl.load(ws_ptr + rows_n * ws_row_stride)
    acc = acc * ws[:, None] * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_n).to(tl.float32)[:, None]
    # y[m, n] = acc[n, m]
    y_ptrs = y_ptr + offs_m[None, :] * y_row_stride + offs_n[:, None]
    y_mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def quantize_fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None, out: torch.Tensor, config: Fp8GemvConfig,
                      use_dot: bool = True, divide: bool = False) -> torch.Tensor:
    """Launch the fused kernel (M <= FP8_GEMV_MAX_M rows) into out [M, N] (contiguous)."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= FP8_GEMV_MAX_M, f"{m} rows: the fused GEMV takes at most {FP8_GEMV_MAX_M}"
    assert x.stride(1) == 1 and weight.is_contiguous() and weight_scale.is_contiguous()
    assert out.is_contiguous() and out.shape == (m, n)
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous(), f"bias {tuple(bias.shape)}: expected contiguous [{n}]"
    with interpreter_upcast((x, weight, bias), (out,)) as ((x, weight, bias), (y,)):
        _quantize_fp8_gemv_kernel[(triton.cdiv(n, config.block_n),)](
            x, weight, weight_scale, bias if bias is not None else weight_scale, y,
            m, n, k,
            x.stride(0), weight.stride(0), y.stride(0), 0 if weight_scale.numel() == 1 else 1,
            HAS_BIAS=bias is not None, EMULATE_E4M3=triton_interpreter_on(),
            USE_DOT=use_dot or m > 1, DIVIDE=divide,
            MIN_AMAX=MIN_AMAX, FP8_MAX=FP8_MAX,
            DOT_PRECISION="ieee" if triton_interpreter_on() else "tf32",
            MAX_IMPRECISE_ACC=min(config.block_k, FP8_PROMOTE_K),
            BLOCK_M=16 if (use_dot or m > 1) else 1, BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return out


def quantize_fp8_gemm_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    _check(x, weight, weight_scale, bias, out_dtype)
    m, k = x.shape
    n = weight.shape[0]
    if not (1 <= m <= FP8_GEMV_MAX_M and n > 0 and k > 0):
        xq, xs = quantize_fp8_triton(x, None)
        return fp8_gemm_triton(xq, weight, xs, weight_scale, bias, out_dtype)
    require_fp8_gpu(x.device, "quantize_fp8_gemm")
    if x.stride(1) != 1:
        x = x.contiguous()
    return quantize_fp8_gemv(x, weight, weight_scale, bias, torch.empty((m, n), dtype=out_dtype, device=x.device),
                             default_gemv_config(m, n, k, False))


def _quantize_fp8_gemm_fake(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)


quantize_fp8_gemm = register_op("quantize_fp8_gemm", launcher=quantize_fp8_gemm_triton,
                                reference=quantize_fp8_gemm_ref, fake=_quantize_fp8_gemm_fake)
