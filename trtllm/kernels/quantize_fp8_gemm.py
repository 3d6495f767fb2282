"""FP8 quantization of x and the FP8 GEMM, in one op: the decode GEMV quantizes x itself.

    quantize_fp8_gemm(x, w, sw, bias, out_dtype)                  per token
        = fp8_gemm(*quantize_fp8(x, None), w, sw, bias, out_dtype)
    i.e. scale[m] = max(amax(|x[m, :]|), MIN_AMAX) / 448
         y[m, n]  = (sum_k e4m3(x[m, k] / scale[m]) * w[n, k]) * scale[m] * sw[n] (+ bias[n])
    quantize_fp8_gemm(x, w, sw, bias, out_dtype, input_scale)     static: scale[m] = input_scale
        = fp8_gemm(quantize_fp8_static(x, input_scale), w, input_scale, sw, bias, out_dtype)

Shapes: x [M, K] (fp32/fp16/bf16, last dim contiguous, any row stride); w [N, K] float8_e4m3fn
contiguous; sw per-tensor [1] or per-channel [N, 1] fp32 (no block scales: those quantize x
in 1x128 groups, which this op does not do); bias [N] or None; input_scale fp32 [1] (a
checkpoint's calibrated scale) or None. Output [M, N] in out_dtype, contiguous. The formulas
are kernels/quantize_fp8.py's, quantize_fp8_static.py's and fp8_gemm.py's.

Why: at batch-1 decode every FP8 linear whose input no fused producer quantizes (Llama's
o_proj, whose input is attention's output) ran a one-program quantize kernel before the
weight-streaming GEMV. Here one row (M = 1) is one kernel: each program walks x once for its
amax (8 KB of bf16 for K = 4,096, from L2), then streams its 8 weight rows in 2,048-wide steps
on the CUDA cores, quantizing each x step as kernels/quantize_fp8.py's kernel does (div_rn,
clamp, round-to-nearest-even cast: the same e4m3 values) and adding the exact fp8 x e4m3
products in fp32, each step's summed into a [BLOCK_N] accumulator. Other row counts run the two ops: with the rows padded to 16 for tl.dot,
every program quantizing all of them cost more than the quantize kernel saved.

The [BLOCK_N] accumulator (2026-12-07): an elementwise [BLOCK_N, BLOCK_K] one reduced once at the
end held 126 registers a thread at 8 x 1,024 (ptxas, sm_90), the per-step sum 72 at 8 x 1,024 and
124 at 8 x 2,048, so twice the weight bytes a program at the same occupancy. H100, 32 calls in a
CUDA graph (scratch probe against the old kernel, outputs equal): o_proj 9.32 -> 8.45 us a call,
down (K 14,336, partial amaxes) 21.94 -> 21.58; other tiles of the per-step form (4, 8, 16 rows x
512-2,048) were slower. trtllm-bench latency FP8 batch 1 on that H100, trees alternating: 275.1 /
275.0 -> 278.4 / 278.3 tok/s (+1.2%).

Measured on the H100 (32 calls in a CUDA graph, 2026-12-06; a sweep of tiles and variants,
then bench/probes/quantize_in_gemv.py for this kernel): o_proj 4096 x 4096 at M = 1, 10.0 us a
call against 12.1 for quantize_fp8 + fp8_gemm (the probe, on another H100: 9.61 against 11.08);
8 x 1,024 was the fastest of six tiles (4-32 rows, 256-2,048 wide). A tl.dot variant for
M <= 16 (rows padded to 16, each program quantizing all 16) took 17-19 us at M = 4 and 16 with a reciprocal and one fma correction,
35-91 us with div_rn (a slow path for the padded zeros), against 12.0. The sums differ from fp8_gemm's
tl.dot GEMV in order only (rel 2e-7 at N = 4,096; 1.3e-4 where that GEMV's 64-row tiles take
Hopper's fp8 MMA, whose accumulator keeps fewer bits between promotions).

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
    FP8_MAX,
    fp8_gemm_check,
    fp8_gemm_ref,
    fp8_gemm_triton,
)
from trtllm.kernels.fp8_gemm_configs import Fp8GemvConfig
from trtllm.kernels.pdl import pdl_options, wait_for_previous
from trtllm.kernels.quantize_fp8 import MIN_AMAX, quantize_fp8_ref, quantize_fp8_triton, require_fp8_gpu
from trtllm.kernels.quantize_fp8_static import check_static_scale, quantize_fp8_static_ref, quantize_fp8_static_triton
from trtllm.kernels.registry import interpreter_upcast, register_op, triton_interpreter_on

_IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# 8 weight rows a program, 2,048-wide K steps (the docstring's measurements); num_stages 1: the
# loads feed no tl.dot, so Triton would not pipeline them
ONE_ROW = Fp8GemvConfig(block_n=8, block_k=2048, num_warps=4, num_stages=1)


def quantize_fp8_gemm_check(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                            out_dtype: torch.dtype, input_scale: torch.Tensor | None = None) -> None:
    assert x.dtype in _IN_DTYPES, f"x: dtype {x.dtype}, expected one of {_IN_DTYPES}"
    assert x.dim() == 2, f"x: {tuple(x.shape)} is not an [M, K] matrix"
    assert weight.dim() == 2 and weight.shape[1] == x.shape[1], \
        f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}"
    assert tuple(weight_scale.shape) in ((1,), (weight.shape[0], 1)), (
        f"weight_scale {tuple(weight_scale.shape)}: quantize_fp8_gemm takes per-tensor (1,) or "
        f"per-channel ({weight.shape[0]}, 1) weight scales (block weights quantize x in groups)")
    if input_scale is not None:
        check_static_scale(input_scale, x.device)
    # the rest of fp8_gemm's checks, on the operands it would see (x quantized per token or by input_scale)
    m, k = x.shape
    x_scale = input_scale if input_scale is not None else torch.empty((m, 1), dtype=torch.float32, device=x.device)
    fp8_gemm_check(torch.empty((), dtype=FP8_DTYPE, device=x.device).expand(m, k), weight, x_scale, weight_scale,
                   bias, out_dtype)


def quantize_fp8_gemm_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                          input_scale: torch.Tensor | None = None) -> torch.Tensor:
    quantize_fp8_gemm_check(x, weight, weight_scale, bias, out_dtype, input_scale)
    if input_scale is not None:
        return fp8_gemm_ref(quantize_fp8_static_ref(x, input_scale), weight, input_scale, weight_scale, bias,
                            out_dtype)
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
def _quantize_fp8_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, amax_ptr,
    N, K, N_AMAX,
    w_row_stride, ws_row_stride,
    HAS_BIAS: tl.constexpr,
    AMAX_BLOCK: tl.constexpr,      # > 0: x's amax is the max of N_AMAX partial amaxes its producer stored
    STATIC: tl.constexpr,          # the scale is given: one fp32 at amax_ptr (a checkpoint's input_scale)
    EMULATE_E4M3: tl.constexpr,    # interpreted: round x to e4m3 in fp32 (see the docstring)
    MIN_AMAX: tl.constexpr, FP8_MAX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    PDL: tl.constexpr = False,     # kernels/pdl.py
):
    wait_for_previous(PDL)
    # Grid: (cdiv(N, BLOCK_N),). One row x [K]: each program finds its scale, then streams W[rows, :] once.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    if STATIC:
        scale = tl.load(amax_ptr)
    elif AMAX_BLOCK > 0:
        parts = tl.arange(0, AMAX_BLOCK)
        amax = tl.max(tl.load(amax_ptr + parts, mask=parts < N_AMAX, other=0.0), axis=0)
    else:
        amax = 0.0
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + k0 + offs_k, mask=(k0 + offs_k) < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
    if not STATIC:  # div_rn: the IEEE quotient quantize_fp8 computes
        scale = tl.math.div_rn(tl.maximum(amax, MIN_AMAX), FP8_MAX)

    w_ptrs = w_ptr + rows_n[:, None] * w_row_stride + offs_k[None, :]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            x = tl.load(x_ptr + k0 + offs_k)
        else:
            k_mask = (k0 + offs_k) < K
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + k0 + offs_k, mask=k_mask, other=0.0)
        q = tl.math.div_rn(x.to(tl.float32), scale)
        q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
        if EMULATE_E4M3:
            q = round_to_e4m3(q)
        else:
            q = q.to(tl.float8e4nv).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * q[None, :], axis=1)  # fp8 x e4m3 products: exact in fp32
        w_ptrs += BLOCK_K

    y = acc * tl.load(ws_ptr + rows_n * ws_row_stride) * scale  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows_n).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


def quantize_fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None, out: torch.Tensor, config: Fp8GemvConfig = ONE_ROW,
                      amax_parts: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the fused kernel for one row x [1, K] into out [1, N] (contiguous). amax_parts
    (fp32 [P], e.g. from kernels/silu_mul_fp8_gemm.py's producer): the row's amax is their max,
    not a walk over x in every program. input_scale (fp32 [1]): x quantizes by it (static)."""
    m, k = x.shape
    n = weight.shape[0]
    assert m == 1, f"{m} rows: the fused GEMV takes one"
    assert amax_parts is None or input_scale is None, "a static input scale leaves no amax to take"
    if amax_parts is not None:
        assert amax_parts.dim() == 1 and amax_parts.dtype == torch.float32 and amax_parts.is_contiguous()
    assert x.stride(1) == 1 and weight.is_contiguous() and weight_scale.is_contiguous()
    assert out.is_contiguous() and out.shape == (m, n)
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous(), f"bias {tuple(bias.shape)}: expected contiguous [{n}]"
    with interpreter_upcast((x, weight, bias), (out,)) as ((x, weight, bias), (y,)):
        _quantize_fp8_gemv_kernel[(triton.cdiv(n, config.block_n),)](
            x, weight, weight_scale, bias if bias is not None else weight_scale, y,
            input_scale if input_scale is not None else amax_parts if amax_parts is not None else weight_scale,
            n, k, 0 if amax_parts is None else amax_parts.numel(),
            weight.stride(0), 0 if weight_scale.numel() == 1 else 1,
            HAS_BIAS=bias is not None,
            AMAX_BLOCK=0 if amax_parts is None else triton.next_power_of_2(amax_parts.numel()),
            STATIC=input_scale is not None,
            EMULATE_E4M3=triton_interpreter_on(),
            MIN_AMAX=MIN_AMAX, FP8_MAX=FP8_MAX,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
            num_warps=config.num_warps, num_stages=config.num_stages, **pdl_options(x),
        )
    return out


def quantize_fp8_gemm_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                             input_scale: torch.Tensor | None = None) -> torch.Tensor:
    quantize_fp8_gemm_check(x, weight, weight_scale, bias, out_dtype, input_scale)
    m, k = x.shape
    n = weight.shape[0]
    if not (m == 1 and n > 0 and k > 0):
        if input_scale is not None:
            return fp8_gemm_triton(quantize_fp8_static_triton(x, input_scale), weight, input_scale, weight_scale,
                                   bias, out_dtype)
        xq, xs = quantize_fp8_triton(x, None)
        return fp8_gemm_triton(xq, weight, xs, weight_scale, bias, out_dtype)
    require_fp8_gpu(x.device, "quantize_fp8_gemm")
    if x.stride(1) != 1:
        x = x.contiguous()
    return quantize_fp8_gemv(x, weight, weight_scale, bias, torch.empty((m, n), dtype=out_dtype, device=x.device),
                             input_scale=input_scale)


def _quantize_fp8_gemm_fake(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                            input_scale: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)


quantize_fp8_gemm = register_op("quantize_fp8_gemm", launcher=quantize_fp8_gemm_triton,
                                reference=quantize_fp8_gemm_ref, fake=_quantize_fp8_gemm_fake)
