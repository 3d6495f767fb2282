"""Static FP8 (e4m3) quantization of activations: one calibrated per-tensor scale.

    x_fp8[m, k] = clamp(x[m, k] / scale, -448, 448).to(float8_e4m3fn)

so that x ~ x_fp8 * scale (the multiplier kernels/fp8_gemm.py takes as x_scale). Shapes: x
[M, K] (fp32/fp16/bf16, last dim contiguous, any row stride); scale fp32 [1] (a checkpoint's
`input_scale`: ModelOpt FP8, compressed-tensors static, HF fp8 `activation_scheme: static`).
Output x_fp8 [M, K] float8_e4m3fn, contiguous. The division is IEEE (div_rn, as torch
divides the fp32 upcast of x by the fp32 scale) and the cast rounds to nearest-even, so the
output is the reference's bit for bit.

Why an op: written as torch ops (div, clamp, cast) the quantization was compute the passes
left in every layer, so a model with static scales went to Inductor, whose compile cost a
cold start tens of seconds (trtllm/inductor_choice.py has the figures); as an op, the graph
has no work left for it. Elementwise, so the programs tile the matrix: (rows, 1,024-wide
column blocks).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtllm.kernels.pdl import pdl_options, wait_for_previous
from trtllm.kernels.quantize_fp8 import FP8_DTYPE, FP8_MAX, require_fp8_gpu
from trtllm.kernels.registry import interpreter_upcast, register_op

_IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_K = 1024


def check_static_scale(scale: torch.Tensor, device: torch.device, name: str = "input_scale",
                       group_size: int | None = None) -> None:
    """The checks every op taking a static scale makes: one fp32 [1] on the data's device, and
    no group size beside it (a static scale is per tensor)."""
    assert group_size is None, f"group_size {group_size} with a static {name}: a static scale is per tensor"
    assert scale.dtype == torch.float32 and scale.shape == (1,) and scale.device == device, (
        f"{name}: {scale.dtype} {tuple(scale.shape)}, expected one fp32 per-tensor scale of shape (1,) on "
        f"{device} (it is on {scale.device})")


def _check(x: torch.Tensor, scale: torch.Tensor) -> None:
    assert x.dtype in _IN_DTYPES, f"x: dtype {x.dtype}, expected one of {_IN_DTYPES}"
    assert x.dim() == 2, f"x: {tuple(x.shape)} is not an [M, K] matrix"
    check_static_scale(scale, x.device, "scale")


def quantize_fp8_static_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _check(x, scale)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).contiguous()


def quantize_fp8_static_rows_ref(y: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y quantized by `scale`, the scale per row [M, 1]): what a fused producer's static mode
    returns (rms_norm_quant_fp8, silu_mul_quant_fp8). `repeat` copies even one row: an op's
    output may not alias its input."""
    return quantize_fp8_static_ref(y, scale), scale.reshape(1, 1).repeat(y.shape[0], 1)


@triton.jit
def store_fp8_static(y, q_ptrs, mask, scale, FP8_MAX: tl.constexpr):
    """Quantize fp32 y by the given scale and store it at q_ptrs: the formula above. Kernels
    that fuse a producer with a static quantization (rms_norm_quant_fp8, silu_mul_quant_fp8)
    call it on their output tile."""
    q = tl.minimum(tl.maximum(tl.math.div_rn(y, scale), -FP8_MAX), FP8_MAX)
    tl.store(q_ptrs, q.to(q_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_fp8_static_kernel(
    x_ptr, s_ptr, q_ptr,
    K,
    x_row_stride, q_row_stride,
    FP8_MAX: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,     # kernels/pdl.py
):
    wait_for_previous(PDL)
    # Grid: (M, cdiv(K, BLOCK)).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    store_fp8_static(x, q_ptr + row * q_row_stride + cols, mask, tl.load(s_ptr), FP8_MAX)


def quantize_fp8_static_triton(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _check(x, scale)
    assert x.stride(1) == 1 or x.shape[1] <= 1, "x: last dim must be contiguous"
    m, k = x.shape
    require_fp8_gpu(x.device, "quantize_fp8_static")
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    if m == 0 or k == 0:
        return q
    # Interpreted, q is an fp32 copy rounded to e4m3 by torch (registry.interpreter_upcast).
    with interpreter_upcast((x,), (q,)) as ((x,), (q_k,)):
        _quantize_fp8_static_kernel[(m, triton.cdiv(k, BLOCK_K))](
            x, scale, q_k, k, x.stride(0), q_k.stride(0),
            FP8_MAX=FP8_MAX, BLOCK=BLOCK_K, num_warps=4, **pdl_options(x),
        )
    return q


def _quantize_fp8_static_fake(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=FP8_DTYPE)


quantize_fp8_static = register_op("quantize_fp8_static", launcher=quantize_fp8_static_triton,
                                  reference=quantize_fp8_static_ref, fake=_quantize_fp8_static_fake)
