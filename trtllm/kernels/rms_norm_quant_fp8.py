"""RMS norm (optionally after the residual add) with its output quantized to FP8 (e4m3) in
the same kernel, for the FP8 linear that follows it.

    rms_norm_quant_fp8(x, w, eps, group_size, unit_offset)
        = quantize_fp8(rms_norm(x, w, eps, unit_offset), group_size)
    fused_add_rms_norm_quant_fp8(x, r, w, eps, group_size, unit_offset)
        = (*quantize_fp8(rms_norm(s, w, eps, unit_offset), group_size), s)   with s = (x + r).to(x.dtype)

With a static input scale (a checkpoint's calibrated per-tensor `input_scale`, fp32 [1]; no
group_size) the quantization is kernels/quantize_fp8_static.py's instead, and the scale output
is that scale for every row:

    rms_norm_quant_fp8(x, w, eps, None, unit_offset, input_scale)
        = (quantize_fp8_static(rms_norm(x, w, eps, unit_offset), input_scale), input_scale per row)

(kernels/rms_norm.py and kernels/quantize_fp8.py define the two halves, roundings
included: the norm's output is rounded to x.dtype before its amax is taken, as the unfused
pair computes.) Shapes: x, r [M, N] of one dtype (fp32/fp16/bf16), last dim contiguous;
w [N] contiguous. Outputs contiguous: x_fp8 [M, N] float8_e4m3fn; scale fp32 [M, 1]
(group_size None: per token) or [M, ceil(N/group_size)]; s [M, N] in x.dtype.

Why: between the norm and the GEMM the unfused pair writes and reads the normalized row
once more and launches a second kernel; here the row is read once and leaves as fp8.

One program per row: the row as a [BLOCK_G, GROUP] tile (quantize_fp8's layout), the sum
of squares over all of it, the amax per group. Rows up to 65536 elements. Interpreted, the
kernel runs in fp32 (registry.interpreter_upcast) and skips the norm's roundings to bf16,
as rms_norm does there: the interpreted result may differ from the reference by those.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtllm.kernels.pdl import pdl_options, wait_for_previous
from trtllm.kernels.quantize_fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    MIN_AMAX,
    quantize_fp8_ref,
    require_fp8_gpu,
    store_fp8_groups,
)
from trtllm.kernels.quantize_fp8_static import check_static_scale, quantize_fp8_static_rows_ref, store_fp8_static
from trtllm.kernels.registry import interpreter_upcast, register_op, row_num_warps
from trtllm.kernels.rms_norm import fused_add_rms_norm_ref, rms_norm_ref

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _quantize_ref(normed: torch.Tensor, group_size: int | None,
                  input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if input_scale is None:
        return quantize_fp8_ref(normed, group_size)
    return quantize_fp8_static_rows_ref(normed, input_scale)


def rms_norm_quant_fp8_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None,
                           unit_offset: bool = False,
                           input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, None, weight, group_size, input_scale)
    return _quantize_ref(rms_norm_ref(x, weight, eps, unit_offset), group_size, input_scale)


def fused_add_rms_norm_quant_fp8_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None,
    unit_offset: bool = False, input_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, residual, weight, group_size, input_scale)
    normed, summed = fused_add_rms_norm_ref(x, residual, weight, eps, unit_offset)
    return (*_quantize_ref(normed, group_size, input_scale), summed)


@triton.jit
def _rms_norm_quant_fp8_kernel(
    x_ptr, residual_ptr, weight_ptr, q_ptr, s_ptr, sum_ptr, static_scale_ptr,
    N, N_GROUPS,
    x_row_stride, residual_row_stride, q_row_stride, s_row_stride, sum_row_stride,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,
    STATIC: tl.constexpr,    # quantize with the scale at static_scale_ptr (no amax)
    MIN_AMAX: tl.constexpr,
    FP8_MAX: tl.constexpr,
    GROUP: tl.constexpr,     # elements per group (per-token: N padded to a power of 2)
    BLOCK_G: tl.constexpr,   # groups per row, padded to a power of 2
    PDL: tl.constexpr = False,     # kernels/pdl.py
):
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    groups = tl.arange(0, BLOCK_G)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]   # [BLOCK_G, GROUP]
    mask = cols < N
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * sum_row_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(tl.sum(xf * xf, axis=1), axis=0) / N + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:  # Gemma: fp32 throughout, one rounding
        y = (xf * rstd) * (1.0 + w)
    else:            # Llama: the normalized value rounded to x.dtype before the weight multiply
        y = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * w
    y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # the norm's output, as the unfused pair has it
    if STATIC:  # quantize_fp8_static's formula
        scale = tl.load(static_scale_ptr)
        store_fp8_static(y, q_ptr + row * q_row_stride + cols, mask, scale, FP8_MAX)
        tl.store(s_ptr + row * s_row_stride, scale)
    else:
        store_fp8_groups(y, q_ptr + row * q_row_stride, s_ptr + row * s_row_stride, cols, mask, N_GROUPS,
                         MIN_AMAX, FP8_MAX, BLOCK_G)


def _check(x, residual, weight, group_size, input_scale=None) -> None:
    assert x.dtype in _FLOAT_DTYPES, f"x: dtype {x.dtype}, expected one of {_FLOAT_DTYPES}"
    assert x.dim() == 2, f"x: {tuple(x.shape)} is not an [M, N] matrix"
    n = x.shape[1]
    assert weight.shape == (n,) and weight.is_contiguous(), \
        f"weight {tuple(weight.shape)}: expected a contiguous ({n},) vector"
    assert weight.device == x.device, f"weight on {weight.device}, x on {x.device}"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device, \
            f"residual {tuple(residual.shape)} {residual.dtype}: expected x's {tuple(x.shape)} {x.dtype}"
    if group_size is not None:
        assert group_size >= 16 and group_size & (group_size - 1) == 0, \
            f"group_size {group_size}: expected a power of 2 >= 16 (or None for per-token)"
    if input_scale is not None:
        check_static_scale(input_scale, x.device, group_size=group_size)


def _launch(x, residual, weight, eps, group_size, unit_offset, input_scale):
    _check(x, residual, weight, group_size, input_scale)
    m, n = x.shape
    assert n <= 65536, f"x: rows of {n} elements; one row must fit one program (65536)"
    for name, t in (("x", x), ("residual", residual)):
        assert t is None or t.stride(1) == 1 or n <= 1, f"{name}: last dim must be contiguous"
    group = triton.next_power_of_2(max(n, 1)) if group_size is None else group_size
    n_groups = 1 if group_size is None else triton.cdiv(n, group)
    require_fp8_gpu(x.device, "rms_norm_quant_fp8")
    q = torch.empty((m, n), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, n_groups), dtype=torch.float32, device=x.device)
    summed = torch.empty((m, n), dtype=x.dtype, device=x.device) if residual is not None else None
    if m == 0 or n == 0:
        if summed is not None:
            summed.copy_(x + residual)
        return q, (scale.copy_(input_scale.expand(m, 1)) if input_scale is not None
                   else scale.fill_(MIN_AMAX / FP8_MAX)), summed
    r = residual if residual is not None else x
    s_out = summed if summed is not None else q  # not written without a residual
    with interpreter_upcast((x, r, weight), (q, s_out)) as ((x, r, weight), (q_k, s_k)):
        _rms_norm_quant_fp8_kernel[(m,)](
            x, r, weight, q_k, scale, s_k, input_scale if input_scale is not None else scale,
            n, n_groups,
            x.stride(0), r.stride(0), q_k.stride(0), scale.stride(0), s_k.stride(0),
            eps,
            HAS_RESIDUAL=residual is not None, UNIT_OFFSET=unit_offset, STATIC=input_scale is not None,
            MIN_AMAX=MIN_AMAX, FP8_MAX=FP8_MAX, GROUP=group, BLOCK_G=triton.next_power_of_2(n_groups),
            num_warps=row_num_warps(n, 512, lo=4), **pdl_options(x),
        )
    return q, scale, summed


def rms_norm_quant_fp8_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None,
                              unit_offset: bool = False,
                              input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, None, weight, eps, group_size, unit_offset, input_scale)[:2]


def fused_add_rms_norm_quant_fp8_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None,
    unit_offset: bool = False, input_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(x, residual, weight, eps, group_size, unit_offset, input_scale)


def _quantized_fake(x: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    n_groups = 1 if group_size is None else -(-x.shape[1] // group_size)
    return (x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((x.shape[0], n_groups), dtype=torch.float32))


def _rms_norm_quant_fp8_fake(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None,
                             unit_offset: bool = False,
                             input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantized_fake(x, group_size)


def _fused_add_rms_norm_quant_fp8_fake(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None,
    unit_offset: bool = False, input_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (*_quantized_fake(x, group_size), x.new_empty(x.shape))


rms_norm_quant_fp8 = register_op(
    "rms_norm_quant_fp8", launcher=rms_norm_quant_fp8_triton, reference=rms_norm_quant_fp8_ref,
    fake=_rms_norm_quant_fp8_fake)
fused_add_rms_norm_quant_fp8 = register_op(
    "fused_add_rms_norm_quant_fp8", launcher=fused_add_rms_norm_quant_fp8_triton,
    reference=fused_add_rms_norm_quant_fp8_ref, fake=_fused_add_rms_norm_quant_fp8_fake)
