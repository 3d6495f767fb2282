"""SwiGLU's gated product, its per-token FP8 quantization and the FP8 down projection, as one op.

    silu_mul_fp8_gemm(gate, up, w, sw, bias, out_dtype)
        = fp8_gemm(*silu_mul_quant_fp8(gate, up, None), w, sw, bias, out_dtype)
    i.e. h[m, k]   = bf16(silu(gate[m, k]) * up[m, k])             (rounded to gate.dtype)
         scale[m]  = max(amax(|h[m, :]|), MIN_AMAX) / 448
         y[m, n]   = (sum_k e4m3(h[m, k] / scale[m]) * w[n, k]) * scale[m] * sw[n] (+ bias[n])
    silu_mul_fp8_gemm(gate, up, w, sw, bias, out_dtype, input_scale)    static: scale[m] = input_scale
        = fp8_gemm(silu_mul_quant_fp8(gate, up, None, input_scale)[0], w, input_scale, sw, bias, out_dtype)

Shapes: gate, up [M, K] of one dtype (fp32/fp16/bf16), last dim contiguous, any row strides
(the two halves of the gate_up projection's [M, 2K] output); w [N, K] float8_e4m3fn
contiguous; sw per-tensor [1] or per-channel [N, 1] fp32; bias [N] or None; input_scale fp32
[1] (a checkpoint's calibrated scale) or None. Output [M, N] in out_dtype. The formulas are kernels/silu_mul_quant_fp8.py's and kernels/fp8_gemm.py's.

Why: at batch-1 decode silu_mul_quant_fp8 is one program walking the whole 14,336-wide row
(a per-token amax needs all of it): 6.5 us a layer on the H200, where silu_mul spread over
programs takes ~1.5. Here one row (M = 1) is two kernels: `_silu_mul_amax_kernel` spreads
the product over 1,024-wide programs, each storing its slice of h and the slice's amax; then
the one-row quantizing GEMV (kernels/quantize_fp8_gemm.py) takes the row's amax as the max of
those partial amaxes, quantizes each h step as it streams its weight rows (div_rn: the same
e4m3 values as silu_mul_quant_fp8) and adds the exact fp8 x e4m3 products in fp32. Other
row counts run silu_mul_quant_fp8 and fp8_gemm. With a static scale the GEMV divides by it
(the partial amaxes go unread), so a static-scale checkpoint's down projection streams its
weight on the CUDA cores as the dynamic one's does (down 4096 x 14336 on pre-quantized x, H100:
22.0 us there against 24.4 for fp8_gemm's tl.dot GEMV; docs/decisions/decode_launches.md).

Measured on the H100 (2026-12-06, bench/probes/quantize_in_gemv.py, 32 calls in a CUDA graph):
down 4096 x 14336 at M = 1, 23.68 us a call against 29.70 for silu_mul_quant_fp8 + fp8_gemm;
trtllm-bench latency FP8 batch 1 262 -> 276 tok/s (docs/decisions/decode_launches.md).

Interpreted (TRITON_INTERPRET=1), bf16 runs in fp32 (registry.interpreter_upcast) and h is
rounded to bf16 by `round_to_bf16` in bit arithmetic, so the one-row path quantizes the GPU's
values there too (silu_mul_quant_fp8, for other row counts, skips that rounding interpreted).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtllm.kernels.fp8_gemm import fp8_gemm_ref, fp8_gemm_triton
from trtllm.kernels.pdl import pdl_options, wait_for_previous
from trtllm.kernels.quantize_fp8 import require_fp8_gpu
from trtllm.kernels.quantize_fp8_gemm import quantize_fp8_gemm_check, quantize_fp8_gemv
from trtllm.kernels.registry import interpreter_upcast, register_op, triton_interpreter_on
from trtllm.kernels.silu_mul_quant_fp8 import silu_mul_quant_fp8_ref, silu_mul_quant_fp8_triton

# h's slice a program: 14 programs for Llama-3-8B's 14,336 (the GEMV reads 14 partial amaxes)
BLOCK_H = 1024


def _check(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
           bias: torch.Tensor | None, out_dtype: torch.dtype, input_scale: torch.Tensor | None) -> None:
    assert gate.dim() == 2 and up.shape == gate.shape and up.dtype == gate.dtype, \
        f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype}: expected two [M, K] of one dtype"
    quantize_fp8_gemm_check(gate, weight, weight_scale, bias, out_dtype, input_scale)


def silu_mul_fp8_gemm_ref(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                          input_scale: torch.Tensor | None = None) -> torch.Tensor:
    _check(gate, up, weight, weight_scale, bias, out_dtype, input_scale)
    hq, hs = silu_mul_quant_fp8_ref(gate, up, None, input_scale)
    return fp8_gemm_ref(hq, weight, hs if input_scale is None else input_scale, weight_scale, bias, out_dtype)


@triton.jit
def round_to_bf16(v):
    """fp32 v -> the nearest bf16 value (ties to even), as fp32: the interpreter's own cast
    truncates (registry.interpreter_upcast)."""
    bits = v.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _silu_mul_amax_kernel(
    gate_ptr, up_ptr, h_ptr, amax_ptr,
    K,
    BLOCK: tl.constexpr,
    EMULATE_BF16: tl.constexpr,    # interpreted bf16 (held in fp32): round h to bf16 in bit arithmetic
    PDL: tl.constexpr = False,     # kernels/pdl.py
):
    wait_for_previous(PDL)
    # Grid: (cdiv(K, BLOCK),), one row: h's slice and its amax, for the GEMV to reduce.
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < K
    gate = tl.load(gate_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # rounded to the input dtype, as silu_mul_quant_fp8 quantizes it
    h = gate * tl.sigmoid(gate) * up
    if EMULATE_BF16:
        h = round_to_bf16(h)
    h = h.to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + cols, h, mask=mask)
    tl.store(amax_ptr + tl.program_id(0), tl.max(tl.abs(h.to(tl.float32)), axis=0))


def silu_mul_fp8_gemm_triton(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                             input_scale: torch.Tensor | None = None) -> torch.Tensor:
    _check(gate, up, weight, weight_scale, bias, out_dtype, input_scale)
    m, k = gate.shape
    n = weight.shape[0]
    if not (m == 1 and n > 0 and k > 0):
        hq, hs = silu_mul_quant_fp8_triton(gate, up, None, input_scale)
        return fp8_gemm_triton(hq, weight, hs if input_scale is None else input_scale, weight_scale, bias, out_dtype)
    require_fp8_gpu(gate.device, "silu_mul_fp8_gemm")
    assert gate.stride(1) == 1 and up.stride(1) == 1, "gate, up: last dim must be contiguous"
    parts = triton.cdiv(k, BLOCK_H)
    amax = torch.empty(parts, dtype=torch.float32, device=gate.device)
    with interpreter_upcast((gate, up)) as ((gate_k, up_k), ()):
        h = torch.empty((1, k), dtype=gate_k.dtype, device=gate.device)
        _silu_mul_amax_kernel[(parts,)](gate_k, up_k, h, amax, k, BLOCK=BLOCK_H,
                                        EMULATE_BF16=gate.dtype == torch.bfloat16 and triton_interpreter_on(),
                                        num_warps=4, **pdl_options(gate))
        out = torch.empty((m, n), dtype=out_dtype, device=gate.device)
        if input_scale is not None:
            return quantize_fp8_gemv(h, weight, weight_scale, bias, out, input_scale=input_scale)
        return quantize_fp8_gemv(h, weight, weight_scale, bias, out, amax_parts=amax)


def _silu_mul_fp8_gemm_fake(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                            input_scale: torch.Tensor | None = None) -> torch.Tensor:
    return gate.new_empty((gate.shape[0], weight.shape[0]), dtype=out_dtype)


silu_mul_fp8_gemm = register_op("silu_mul_fp8_gemm", launcher=silu_mul_fp8_gemm_triton,
                                reference=silu_mul_fp8_gemm_ref, fake=_silu_mul_fp8_gemm_fake)
