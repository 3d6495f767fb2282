"""The residual add, the RMS norm and the one-row GEMV it feeds, in one kernel.

    add_rms_norm_linear(x, r, nw, eps, unit_offset, w, bias)
        = (linear(y, w, bias), s)                                        y, s = fused_add_rms_norm(x, r, nw, eps, unit_offset)
    add_rms_norm_linear(x, r, nw, eps, unit_offset, w, bias, pre_weight=v)      (Gemma-2/3's sandwich norms)
        = (linear(y, w, bias), s)                       y, s = norm_add_rms_norm(x, v, r, nw, eps, unit_offset)
    add_rms_norm_fp8_gemm(x, r, nw, eps, unit_offset, w8, sw, bias, out_dtype, input_scale)
        = (fp8_gemm(*quantize_fp8(y, None), w8, sw, bias, out_dtype), s)                  per token
        = (fp8_gemm(quantize_fp8_static(y, input_scale), w8, input_scale, sw, bias, out_dtype), s)  static

(kernels/rms_norm.py, quantize_fp8.py, quantize_fp8_static.py, linear.py and fp8_gemm.py define
the parts, roundings included: s rounded to x.dtype, the norm's output rounded to x.dtype before
it is quantized or multiplied.) Shapes: x, r [..., K] of one dtype (fp32/fp16/bf16), M rows in
all; nw [K]; w [N, K] contiguous in x.dtype, or w8 [N, K] float8_e4m3fn with sw per
tensor [1] or per channel [N, 1] fp32; bias [N] or None; input_scale fp32 [1] or None.
Outputs: y [..., N] (x.dtype, or out_dtype for FP8), s [..., K] in x.dtype, both contiguous.

Why: at batch-1 decode a Llama layer ran its residual add + norm (+ quantization) as a
one-program kernel before each of two weight-streaming GEMVs (qkv, gate_up): 64 launches of
~3 us a step on the H200 (bench/RESULTS.md's decode-step profile), each on the critical path.
Here one row (M = 1) is one kernel: every program reads x, r and nw (K <= 8,192: the whole
row in registers, from L2 after the first program), computes s, the norm and, for FP8, the
row's amax and its e4m3 values, then loops over blocks of BLOCK_N weight rows (each block
the whole K wide, `programs` programs striding over the N / BLOCK_N blocks) on the CUDA
cores. Program 0 stores s. Other row counts run the two ops, as before.

Interpreted (TRITON_INTERPRET=1) bf16 tensors are fp32 copies (registry.interpreter_upcast);
the roundings to bf16 are done in bit arithmetic (`round_to_bf16`) and the cast to e4m3 by
`round_to_e4m3`, so the interpreted values are the GPU's.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from trtllm.kernels.fp8_gemm import FP8_DTYPE, FP8_MAX, fp8_gemm_check, fp8_gemm_ref, fp8_gemm_triton
from trtllm.kernels.linear import check_linear, linear_ref, linear_triton
from trtllm.kernels.pdl import pdl_options, wait_for_previous
from trtllm.kernels.quantize_fp8 import MIN_AMAX, quantize_fp8_ref, require_fp8_gpu
from trtllm.kernels.quantize_fp8_gemm import round_to_e4m3
from trtllm.kernels.quantize_fp8_static import check_static_scale, quantize_fp8_static_ref
from trtllm.kernels.registry import interpreter_upcast, register_op, triton_interpreter_on
from trtllm.kernels.rms_norm import (
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    norm_add_rms_norm_triton,
    rms_norm_ref,
)
from trtllm.kernels.rms_norm_quant_fp8 import fused_add_rms_norm_quant_fp8_triton
from trtllm.kernels.silu_mul_fp8_gemm import round_to_bf16

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_K = 8192  # the row lives in registers: 64 fp32 a thread at 4 warps


class NormGemvConfig(NamedTuple):
    block_n: int           # weight rows a loop step (each the whole K wide)
    num_warps: int
    programs_per_sm: int   # 0: one program per block (no loop)
    prefetch: bool = False  # load the first block before the PDL wait and the norm, each next one a step ahead


# Not yet measured: bench/probes/norm_in_gemv.py sweeps these on the GPU
ONE_ROW = NormGemvConfig(block_n=2, num_warps=8, programs_per_sm=4)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device, blocks: int, config: NormGemvConfig) -> int:
    if config.programs_per_sm == 0:
        return blocks
    sms = 3 if device.type == "cpu" else _sm_count(device.index or 0)  # interpreted: a few, to run the loop
    return max(1, min(blocks, sms * config.programs_per_sm))


def _check(x, residual, norm_weight, pre_weight=None) -> None:
    assert x.dtype in _FLOAT_DTYPES, f"x: dtype {x.dtype}, expected one of {_FLOAT_DTYPES}"
    assert x.dim() >= 1, "x: a scalar is not a row"
    assert residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device, \
        f"residual {tuple(residual.shape)} {residual.dtype}: expected x's {tuple(x.shape)} {x.dtype}"
    k = x.shape[-1]
    assert norm_weight.shape == (k,) and norm_weight.is_contiguous() and norm_weight.device == x.device, \
        f"norm_weight {tuple(norm_weight.shape)}: expected a contiguous ({k},) vector on {x.device}"
    assert pre_weight is None or (pre_weight.shape == (k,) and pre_weight.is_contiguous()
                                  and pre_weight.device == x.device), \
        f"pre_weight {tuple(pre_weight.shape)}: expected a contiguous ({k},) vector on {x.device}"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [M, K] with a contiguous last dim."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def add_rms_norm_linear_ref(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            unit_offset: bool, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            pre_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, residual, norm_weight, pre_weight)
    check_linear(x, weight, bias)
    if pre_weight is not None:
        x = rms_norm_ref(x, pre_weight, eps, unit_offset)
    normed, summed = fused_add_rms_norm_ref(x, residual, norm_weight, eps, unit_offset)
    return linear_ref(normed, weight, bias), summed


def add_rms_norm_fp8_gemm_ref(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                              unit_offset: bool, weight: torch.Tensor, weight_scale: torch.Tensor,
                              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                              input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check_fp8(x, residual, norm_weight, weight, weight_scale, bias, out_dtype, input_scale)
    normed, summed = fused_add_rms_norm_ref(_rows(x), _rows(residual), norm_weight, eps, unit_offset)
    if input_scale is not None:
        y = fp8_gemm_ref(quantize_fp8_static_ref(normed, input_scale), weight, input_scale, weight_scale, bias,
                         out_dtype)
    else:
        xq, xs = quantize_fp8_ref(normed, None)
        y = fp8_gemm_ref(xq, weight, xs, weight_scale, bias, out_dtype)
    return y.view(*x.shape[:-1], weight.shape[0]), summed.view(x.shape)


def _check_fp8(x, residual, norm_weight, weight, weight_scale, bias, out_dtype, input_scale) -> None:
    _check(x, residual, norm_weight)
    assert tuple(weight_scale.shape) in ((1,), (weight.shape[0], 1)), (
        f"weight_scale {tuple(weight_scale.shape)}: add_rms_norm_fp8_gemm takes per-tensor (1,) or "
        f"per-channel ({weight.shape[0]}, 1) weight scales")
    if input_scale is not None:
        check_static_scale(input_scale, x.device)
    m, k = x.numel() // max(x.shape[-1], 1), x.shape[-1]
    x_scale = input_scale if input_scale is not None else torch.empty((m, 1), dtype=torch.float32, device=x.device)
    fp8_gemm_check(torch.empty((), dtype=FP8_DTYPE, device=x.device).expand(m, k), weight, x_scale, weight_scale,
                   bias, out_dtype)


@triton.jit
def _rounded(v, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 v rounded to dtype, as fp32 (interpreted bf16: in bit arithmetic)."""
    if EMULATE_BF16:
        return round_to_bf16(v)
    return v.to(dtype).to(tl.float32)


@triton.jit
def _normed_row(x, w, K, eps, dtype: tl.constexpr, UNIT_OFFSET: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """kernels/rms_norm.py's rms_norm of one fp32 row (masked elements 0), rounded to dtype, as fp32."""
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
    if UNIT_OFFSET:  # Gemma: (1 + w), fp32 until one rounding
        return _rounded((x * rstd) * (1.0 + w), dtype, EMULATE_BF16)
    return _rounded(_rounded(x * rstd, dtype, EMULATE_BF16) * w, dtype, EMULATE_BF16)


@triton.jit
def _weight_block(w_ptr, block, N, w_row_stride, offs_k, k_mask, BLOCK_N: tl.constexpr, valid=True):
    """W[block * BLOCK_N + i, :] for i < BLOCK_N, [BLOCK_N, BLOCK_K]; rows past N read row N - 1 again;
    not `valid`: zeros, nothing read."""
    rows = tl.minimum(block * BLOCK_N + tl.arange(0, BLOCK_N), N - 1).to(tl.int64)
    return tl.load(w_ptr + rows[:, None] * w_row_stride + offs_k[None, :], mask=k_mask[None, :] & valid, other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _add_rms_norm_gemv_kernel(
    x_ptr, r_ptr, nw_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, s_ptr, in_scale_ptr, pre_ptr,
    N, K, w_row_stride, ws_row_stride, eps,
    QUANTIZE: tl.constexpr,        # 0: w in x's dtype; 1: fp8 w, x per token (amax); 2: fp8 w, x by in_scale
    HAS_BIAS: tl.constexpr,
    HAS_PRE_NORM: tl.constexpr,    # x is first normed with the weight at pre_ptr (norm_add_rms_norm)
    UNIT_OFFSET: tl.constexpr,     # Gemma's (1 + nw), fp32 until one rounding
    EMULATE_BF16: tl.constexpr,    # interpreted bf16: roundings in bit arithmetic
    EMULATE_E4M3: tl.constexpr,    # interpreted: the e4m3 cast in bit arithmetic
    MIN_AMAX: tl.constexpr, FP8_MAX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,         # next power of 2 >= K: the whole row
    PREFETCH: tl.constexpr,        # NormGemvConfig.prefetch
    PDL: tl.constexpr = False,     # kernels/pdl.py
):
    # Grid: (programs,). Each program normalizes the one row, then streams blocks pid, pid + programs, ...
    dtype = s_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    n_blocks = tl.cdiv(N, BLOCK_N)
    if PREFETCH:  # the weights are no earlier kernel's output: readable before the wait
        w_next = _weight_block(w_ptr, tl.program_id(0), N, w_row_stride, offs_k, k_mask, BLOCK_N)
    wait_for_previous(PDL)
    x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    if HAS_PRE_NORM:
        x = _normed_row(x, tl.load(pre_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32), K, eps, dtype,
                        UNIT_OFFSET, EMULATE_BF16)
    r = tl.load(r_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    s = _rounded(x + r, dtype, EMULATE_BF16)  # the residual stream lives in x's dtype
    if tl.program_id(0) == 0:
        tl.store(s_ptr + offs_k, s.to(dtype), mask=k_mask)
    h = _normed_row(s, tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32), K, eps, dtype, UNIT_OFFSET,
                    EMULATE_BF16)  # the norm's output, as the unfused ops pass it on
    if QUANTIZE == 1:  # div_rn: quantize_fp8's IEEE quotient
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(h), axis=0), MIN_AMAX), FP8_MAX)
    elif QUANTIZE == 2:
        scale = tl.load(in_scale_ptr)
    if QUANTIZE > 0:
        h = tl.minimum(tl.maximum(tl.math.div_rn(h, scale), -FP8_MAX), FP8_MAX)
        if EMULATE_E4M3:
            h = round_to_e4m3(h)
        else:
            h = h.to(tl.float8e4nv).to(tl.float32)

    for block in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        if PREFETCH:  # this block's rows are in flight; ask for the next one's before using them
            w = w_next
            following = block + tl.num_programs(0)
            w_next = _weight_block(w_ptr, following, N, w_row_stride, offs_k, k_mask, BLOCK_N, following < n_blocks)
        else:
            w = _weight_block(w_ptr, block, N, w_row_stride, offs_k, k_mask, BLOCK_N)
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # past N: row N - 1 again, not stored
        y = tl.sum(w.to(tl.float32) * h[None, :], axis=1)  # [BLOCK_N]
        if QUANTIZE > 0:
            y = y * tl.load(ws_ptr + rows * ws_row_stride) * scale
        if HAS_BIAS:
            y += tl.load(b_ptr + rows).to(tl.float32)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


def add_rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      unit_offset: bool, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                      weight_scale: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                      config: NormGemvConfig = ONE_ROW,
                      pre_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel for one row x, residual [1, K] into out [1, N]; returns (out, s).
    weight_scale given: weight is e4m3 and x quantizes per token, or by input_scale; pre_weight
    given: x is first normed with it."""
    m, k = x.shape
    n = weight.shape[0]
    assert m == 1 and 0 < k <= MAX_K and n > 0, f"x {tuple(x.shape)}, weight {tuple(weight.shape)}: one row of K <= {MAX_K}"
    assert x.stride(1) == 1 and residual.stride(1) == 1, "x, residual: last dim must be contiguous"
    assert weight.is_contiguous() and out.is_contiguous() and out.shape == (m, n)
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous(), f"bias {tuple(bias.shape)}: expected contiguous [{n}]"
    quantize = 0 if weight_scale is None else 2 if input_scale is not None else 1
    blocks = triton.cdiv(n, config.block_n)
    with interpreter_upcast((x, residual, norm_weight, weight, bias, pre_weight), (out,)) as \
            ((x_k, r_k, nw_k, w_k, b_k, pre_k), (y_k,)):
        summed = torch.empty((m, k), dtype=x_k.dtype, device=x.device)
        _add_rms_norm_gemv_kernel[(_programs(x.device, blocks, config),)](
            x_k, r_k, nw_k, w_k, weight_scale if weight_scale is not None else w_k,
            b_k if bias is not None else w_k, y_k, summed,
            input_scale if input_scale is not None else w_k, pre_k if pre_weight is not None else nw_k,
            n, k, w_k.stride(0), 0 if weight_scale is None or weight_scale.numel() == 1 else 1, eps,
            QUANTIZE=quantize, HAS_BIAS=bias is not None, HAS_PRE_NORM=pre_weight is not None, UNIT_OFFSET=unit_offset,
            EMULATE_BF16=x.dtype == torch.bfloat16 and triton_interpreter_on(),
            EMULATE_E4M3=triton_interpreter_on(),
            MIN_AMAX=MIN_AMAX, FP8_MAX=FP8_MAX,
            BLOCK_N=config.block_n, BLOCK_K=triton.next_power_of_2(k), PREFETCH=config.prefetch,
            num_warps=config.num_warps, **pdl_options(x),
        )
    return out, summed.to(x.dtype)


def _one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1] and 0 < x.shape[-1] <= MAX_K and weight.shape[0] > 0


def add_rms_norm_linear_triton(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                               unit_offset: bool, weight: torch.Tensor, bias: torch.Tensor | None = None,
                               pre_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, residual, norm_weight, pre_weight)
    check_linear(x, weight, bias)
    if not _one_row(x, weight):
        if pre_weight is not None:
            normed, summed = norm_add_rms_norm_triton(x, pre_weight, residual, norm_weight, eps, unit_offset)
        else:
            normed, summed = fused_add_rms_norm_triton(x, residual, norm_weight, eps, unit_offset)
        return linear_triton(normed, weight, bias), summed
    out = torch.empty((1, weight.shape[0]), dtype=x.dtype, device=x.device)
    y, summed = add_rms_norm_gemv(_rows(x), _rows(residual), norm_weight, eps, unit_offset, weight, bias, out,
                                  pre_weight=pre_weight)
    return y.view(*x.shape[:-1], weight.shape[0]), summed.view(x.shape)


def add_rms_norm_fp8_gemm_triton(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                 unit_offset: bool, weight: torch.Tensor, weight_scale: torch.Tensor,
                                 bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                                 input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check_fp8(x, residual, norm_weight, weight, weight_scale, bias, out_dtype, input_scale)
    x2, r2 = _rows(x), _rows(residual)
    if not _one_row(x, weight):
        xq, xs, summed = fused_add_rms_norm_quant_fp8_triton(x2, r2, norm_weight, eps, None, unit_offset, input_scale)
        y = fp8_gemm_triton(xq, weight, xs if input_scale is None else input_scale, weight_scale, bias, out_dtype)
    else:
        require_fp8_gpu(x.device, "add_rms_norm_fp8_gemm")
        out = torch.empty((1, weight.shape[0]), dtype=out_dtype, device=x.device)
        y, summed = add_rms_norm_gemv(x2, r2, norm_weight, eps, unit_offset, weight, bias, out,
                                      weight_scale=weight_scale, input_scale=input_scale)
    return y.view(*x.shape[:-1], weight.shape[0]), summed.view(x.shape)


def _add_rms_norm_linear_fake(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                              unit_offset: bool, weight: torch.Tensor, bias: torch.Tensor | None = None,
                              pre_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty(x.shape)


def _add_rms_norm_fp8_gemm_fake(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                unit_offset: bool, weight: torch.Tensor, weight_scale: torch.Tensor,
                                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                                input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype), x.new_empty(x.shape)


add_rms_norm_linear = register_op("add_rms_norm_linear", launcher=add_rms_norm_linear_triton,
                                  reference=add_rms_norm_linear_ref, fake=_add_rms_norm_linear_fake)
add_rms_norm_fp8_gemm = register_op("add_rms_norm_fp8_gemm", launcher=add_rms_norm_fp8_gemm_triton,
                                    reference=add_rms_norm_fp8_gemm_ref, fake=_add_rms_norm_fp8_gemm_fake)
