"""SwiGLU's gated product with its output quantized to FP8 (e4m3) in the same kernel, for
the FP8 down projection that follows it.

    silu_mul_quant_fp8(gate, up, group_size) = quantize_fp8(silu_mul(gate, up), group_size)

(kernels/silu_mul.py and kernels/quantize_fp8.py define the two halves, roundings
included: the product is rounded to gate.dtype before its amax is taken, as the unfused
pair computes.) Shapes: gate, up [M, N] of one dtype (fp32/fp16/bf16), any row strides,
last dim contiguous (typically the two halves of one fused [M, 2N] gate_up output).
Outputs contiguous: x_fp8 [M, N] float8_e4m3fn; scale fp32 [M, 1] (group_size None: per
token) or [M, ceil(N/group_size)].

Why: the unfused pair writes the [M, N] product in bf16, reads it back and launches a
second kernel. Measured in Llama-3.1-8B's FP8 decode graph (bench/probes/decode_kernels.py
--quantization, H200, 2026-12-04): at batch 256 this kernel takes 364 µs a step against the
pair's 417 (silu_mul 183 + its quantization 234; the step 5,514 -> 5,451 µs); at batch 1
it takes 6.5 µs a layer against the pair's 6.0 (silu_mul spread over 7 programs, then one
program quantizing): one row is one program here, as in quantize_fp8, since a per-token
amax needs the whole row.

With a static input scale (a checkpoint's calibrated per-tensor `input_scale`, fp32 [1]; no
group_size) the quantization is kernels/quantize_fp8_static.py's and the scale output is that
scale for every row; no amax is taken, so the programs tile the row (1,024 wide), as silu_mul's.

One program per row: the row as a [BLOCK_G, GROUP] tile (quantize_fp8's layout), the amax
per group. Rows up to 65536 elements. Interpreted, bf16 runs in fp32
(registry.interpreter_upcast) and skips the product's rounding to bf16, as silu_mul does
there: the interpreted result may differ from the reference by that rounding.
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
from trtllm.kernels.silu_mul import silu_mul_ref

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(gate: torch.Tensor, up: torch.Tensor, group_size: int | None, input_scale: torch.Tensor | None = None) -> None:
    assert gate.dtype in _FLOAT_DTYPES, f"gate: dtype {gate.dtype}, expected one of {_FLOAT_DTYPES}"
    assert up.dtype == gate.dtype, f"up: dtype {up.dtype}, gate {gate.dtype}"
    assert gate.dim() == 2 and up.shape == gate.shape, \
        f"gate {tuple(gate.shape)} and up {tuple(up.shape)}: expected two [M, N] matrices of one shape"
    assert up.device == gate.device, f"up on {up.device}, gate on {gate.device}"
    if group_size is not None:
        assert group_size >= 16 and group_size & (group_size - 1) == 0, \
            f"group_size {group_size}: expected a power of 2 >= 16 (or None for per-token)"
    if input_scale is not None:
        check_static_scale(input_scale, gate.device, group_size=group_size)


def silu_mul_quant_fp8_ref(gate: torch.Tensor, up: torch.Tensor, group_size: int | None = None,
                           input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check(gate, up, group_size, input_scale)
    if input_scale is None:
        return quantize_fp8_ref(silu_mul_ref(gate, up), group_size)
    return quantize_fp8_static_rows_ref(silu_mul_ref(gate, up), input_scale)


@triton.jit
def _silu_mul_quant_fp8_static_kernel(
    gate_ptr, up_ptr, q_ptr, s_ptr, static_scale_ptr,
    N,
    gate_row_stride, up_row_stride, q_row_stride, s_row_stride,
    FP8_MAX: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,     # kernels/pdl.py
):
    wait_for_previous(PDL)
    # Grid: (M, cdiv(N, BLOCK)): a given scale needs no row-wide amax.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = (gate * tl.sigmoid(gate) * up).to(gate_ptr.dtype.element_ty).to(tl.float32)  # silu_mul's value
    scale = tl.load(static_scale_ptr)
    store_fp8_static(y, q_ptr + row * q_row_stride + cols, mask, scale, FP8_MAX)
    if tl.program_id(1) == 0:
        tl.store(s_ptr + row * s_row_stride, scale)


@triton.jit
def _silu_mul_quant_fp8_kernel(
    gate_ptr, up_ptr, q_ptr, s_ptr,
    N, N_GROUPS,
    gate_row_stride, up_row_stride, q_row_stride, s_row_stride,
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
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    # silu_mul's value rounded to the input dtype: what the unfused quantization reads
    y = (gate * tl.sigmoid(gate) * up).to(gate_ptr.dtype.element_ty).to(tl.float32)
    store_fp8_groups(y, q_ptr + row * q_row_stride, s_ptr + row * s_row_stride, cols, mask, N_GROUPS,
                     MIN_AMAX, FP8_MAX, BLOCK_G)


def silu_mul_quant_fp8_triton(gate: torch.Tensor, up: torch.Tensor, group_size: int | None = None,
                              input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check(gate, up, group_size, input_scale)
    if input_scale is not None:
        return _static(gate, up, input_scale)
    m, n = gate.shape
    assert n <= 65536, f"gate: rows of {n} elements; one row must fit one program (65536)"
    for name, t in (("gate", gate), ("up", up)):
        assert t.stride(1) == 1 or n <= 1, f"{name}: last dim must be contiguous"
    group = triton.next_power_of_2(max(n, 1)) if group_size is None else group_size
    n_groups = 1 if group_size is None else triton.cdiv(n, group)
    require_fp8_gpu(gate.device, "silu_mul_quant_fp8")
    q = torch.empty((m, n), dtype=FP8_DTYPE, device=gate.device)
    scale = torch.empty((m, n_groups), dtype=torch.float32, device=gate.device)
    if m == 0:
        return q, scale
    if n == 0:
        return q, scale.fill_(MIN_AMAX / FP8_MAX)
    with interpreter_upcast((gate, up), (q,)) as ((gate, up), (q_k,)):
        _silu_mul_quant_fp8_kernel[(m,)](
            gate, up, q_k, scale,
            n, n_groups,
            gate.stride(0), up.stride(0), q_k.stride(0), scale.stride(0),
            MIN_AMAX=MIN_AMAX, FP8_MAX=FP8_MAX, GROUP=group, BLOCK_G=triton.next_power_of_2(n_groups),
            num_warps=row_num_warps(n, 1024, lo=1), **pdl_options(gate),
        )
    return q, scale


def _static(gate: torch.Tensor, up: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = gate.shape
    for name, t in (("gate", gate), ("up", up)):
        assert t.stride(1) == 1 or n <= 1, f"{name}: last dim must be contiguous"
    require_fp8_gpu(gate.device, "silu_mul_quant_fp8")
    q = torch.empty((m, n), dtype=FP8_DTYPE, device=gate.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=gate.device)  # the kernel writes it: no extra launch
    if m == 0 or n == 0:
        return q, scale.copy_(input_scale.expand(m, 1))
    with interpreter_upcast((gate, up), (q,)) as ((gate, up), (q_k,)):
        _silu_mul_quant_fp8_static_kernel[(m, triton.cdiv(n, 1024))](
            gate, up, q_k, scale, input_scale, n, gate.stride(0), up.stride(0), q_k.stride(0), scale.stride(0),
            FP8_MAX=FP8_MAX, BLOCK=1024, num_warps=4, **pdl_options(gate),
        )
    return q, scale


def _silu_mul_quant_fp8_fake(gate: torch.Tensor, up: torch.Tensor, group_size: int | None = None,
                             input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n_groups = 1 if group_size is None else -(-gate.shape[1] // group_size)
    return (gate.new_empty(gate.shape, dtype=FP8_DTYPE),
            gate.new_empty((gate.shape[0], n_groups), dtype=torch.float32))


silu_mul_quant_fp8 = register_op("silu_mul_quant_fp8", launcher=silu_mul_quant_fp8_triton,
                                 reference=silu_mul_quant_fp8_ref, fake=_silu_mul_quant_fp8_fake)
