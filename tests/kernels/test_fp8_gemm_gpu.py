"""GPU-only checks of the FP8 GEMM (kernels/fp8_gemm.py) and quantization
(kernels/quantize_fp8.py, kernels/rms_norm_quant_fp8.py, kernels/silu_mul_quant_fp8.py,
kernels/quantize_fp8_gemm.py): compiled for sm_89+, at Llama-3.1-8B shapes, against
fp8_gemm_ref and against torch._scaled_mm where it takes the same scales (per-tensor;
per-token x per-channel, which it calls rowwise and runs with a bf16 output only). That
the compiled tl.dot takes e4m3 operands is checked without a GPU (tests/kernels/test_fp8_build.py).
Skipped in CI (CPU, interpreter); run on an H100/H200 with

    TRITON_INTERPRET=0 python -m pytest -q tests/kernels/test_fp8_gemm_gpu.py
"""
import os

import pytest
import torch

from trtllm.kernels.fp8_gemm import (
    FP8_DTYPE,
    FP8_MAX,
    fp8_gemm,
    fp8_gemm_ref,
    fp8_gemm_tiles,
)
from trtllm.kernels.fp8_gemm_configs import default_gemm_config
from trtllm.kernels.quantize_fp8 import quantize_fp8, quantize_fp8_ref
from trtllm.kernels.quantize_fp8_gemm import quantize_fp8_gemm, quantize_fp8_gemm_ref
from trtllm.kernels.rms_norm_quant_fp8 import fused_add_rms_norm_quant_fp8, fused_add_rms_norm_quant_fp8_ref
from trtllm.kernels.silu_mul_fp8_gemm import silu_mul_fp8_gemm, silu_mul_fp8_gemm_ref
from trtllm.kernels.silu_mul_quant_fp8 import silu_mul_quant_fp8, silu_mul_quant_fp8_ref

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
    or torch.cuda.get_device_capability() < (8, 9),
    reason="needs an sm_89+ GPU without the Triton interpreter")

# ||y - ref|| / ||ref||. Against the fp32 reference: the sm_90 fp8 MMA adds up to 128 products
# in its own (less than fp32) precision before the promotion to fp32, plus one rounding of
# the output; against _scaled_mm, two such GEMMs rounded to bf16. Not yet measured on a GPU:
# bounds from the output roundings (bf16 2^-9, fp16 2^-12 rms) with room for the MMA's.
MAX_REL_ERR = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 5e-3}
# (N, K): Llama-3.1-8B's qkv, o_proj, gate_up, down; M: decode rows and prefill tokens
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (83, 769)]
MS = [1, 3, 16, 17, 300, 2048]


def cdiv(a, b):
    return -(-a // b)


def inputs(m, n, k, granularity):
    x = (torch.randn(m, k, device="cuda") * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    w = (torch.randn(n, k, device="cuda") * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    shapes = {"tensor": ((1,), (1,)), "token_channel": ((m, 1), (n, 1)),
              "block": ((m, cdiv(k, 128)), (cdiv(n, 128), cdiv(k, 128)))}[granularity]
    xs, ws = (torch.rand(*s, device="cuda") * 0.002 + 0.0005 for s in shapes)
    return x, w, xs, ws


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("granularity", ["tensor", "token_channel", "block"])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_matches_reference(m, n, k, granularity, out_dtype):
    x, w, xs, ws = inputs(m, n, k, granularity)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if m % 2 else None
    y = fp8_gemm(x, w, xs, ws, bias, out_dtype)
    assert rel_err(y, fp8_gemm_ref(x, w, xs, ws, bias, out_dtype)) < MAX_REL_ERR[out_dtype]


@pytest.mark.parametrize("granularity", ["tensor", "token_channel", "block"])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [17, 300, 2048])
def test_tiled_kernel_matches_reference(m, n, k, granularity):
    # On sm_90 the op hands these rows to torch._scaled_mm (but block scales): the tiled
    # kernel, which other GPUs and block scales run, checked by itself.
    x, w, xs, ws = inputs(m, n, k, granularity)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    y = fp8_gemm_tiles(x, w, xs, ws, None, out, default_gemm_config(m, n, k, granularity == "block"))
    assert rel_err(y, fp8_gemm_ref(x, w, xs, ws)) < MAX_REL_ERR[torch.bfloat16]


@pytest.mark.parametrize("granularity", ["tensor", "token_channel"])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_matches_scaled_mm(m, n, k, granularity):
    if k % 16 or n % 16:  # cuBLASLt's FP8 GEMM takes K and N in multiples of 16 only
        pytest.skip("torch._scaled_mm needs K and N divisible by 16")
    x, w, xs, ws = inputs(m, n, k, granularity)
    if granularity == "tensor":
        peer = torch._scaled_mm(x, w.t(), xs.reshape(()), ws.reshape(()), out_dtype=torch.bfloat16)
    else:  # rowwise: scale_a [M, 1], scale_b [1, N]
        peer = torch._scaled_mm(x, w.t(), xs, ws.t(), out_dtype=torch.bfloat16)
    assert rel_err(fp8_gemm(x, w, xs, ws), peer) < MAX_REL_ERR[torch.bfloat16]


@pytest.mark.parametrize("group_size", [None, 128])
def test_quantize_matches_reference(group_size):
    x = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16) * 3
    q, s = quantize_fp8(x, group_size)
    # the reference on the CPU: on CUDA, torch divides by a Python scalar (FP8_MAX) as a
    # multiply by its reciprocal, a last-bit difference in 175 of 300 scales on the H200
    # (2026-12-04); the kernel divides as the IEEE quotient (div_rn), as the CPU does
    q_ref, s_ref = quantize_fp8_ref(x.cpu(), group_size)
    q, s = q.cpu(), s.cpu()
    torch.testing.assert_close(s, s_ref, atol=0, rtol=0)
    torch.testing.assert_close(q.float(), q_ref.float(), atol=0, rtol=2.0 ** -3)
    assert (q.float() != q_ref.float()).float().mean() < 1e-3  # flips at ties only


@pytest.mark.parametrize("group_size", [None, 128])
def test_rms_norm_quant_matches_reference(group_size):
    # the mean of squares divides approximately on the GPU (as kernels/rms_norm.py): the
    # bf16 norm output, so the amax, may move by a bf16 ulp, an e4m3 value by a step
    x = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16) * 3
    r = torch.randn_like(x)
    w = (1 + 0.1 * torch.randn(4096, device="cuda")).to(torch.bfloat16)
    q, s, summed = fused_add_rms_norm_quant_fp8(x, r, w, 1e-5, group_size)
    q_ref, s_ref, summed_ref = fused_add_rms_norm_quant_fp8_ref(x, r, w, 1e-5, group_size)
    torch.testing.assert_close(summed, summed_ref, atol=0, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=2.0 ** -7)
    torch.testing.assert_close(q.float(), q_ref.float(), atol=0, rtol=2.0 ** -3)


@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("m,n", [(1, 14336), (300, 14336), (7, 5125)])
def test_silu_mul_quant_matches_reference(m, n, group_size):
    # the gated product of Llama-3.1-8B's MLP width, as the halves of one gate_up output;
    # tl.sigmoid's last fp32 bit may flip the bf16 product, so the amax by a bf16 ulp
    gate_up = torch.randn(m, 2 * n, device="cuda", dtype=torch.bfloat16) * 3
    gate, up = gate_up[:, :n], gate_up[:, n:]
    q, s = silu_mul_quant_fp8(gate, up, group_size)
    q_ref, s_ref = silu_mul_quant_fp8_ref(gate, up, group_size)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=2.0 ** -7)
    torch.testing.assert_close(q.float(), q_ref.float(), atol=2.0 ** -9, rtol=2.0 ** -3)
    assert (q.float() != q_ref.float()).float().mean() < 1e-2


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3])
def test_quantize_fp8_gemm_is_quantize_then_gemm(m, n, k):
    # kernels/quantize_fp8_gemm.py: one row quantizes x in the GEMV, to the e4m3 values
    # quantize_fp8 writes, and adds exact products in another order than fp8_gemm's tl.dot GEMV
    # (1.3e-4 apart where that GEMV's fp8 MMA keeps fewer accumulator bits); more rows run the two ops
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * torch.rand(m, 1, device="cuda") * 4
    _, w, _, ws = inputs(m, n, k, "token_channel")
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    fused = quantize_fp8_gemm(x, w, ws, bias, torch.float32)
    xq, xs = quantize_fp8(x, None)
    assert rel_err(fused, fp8_gemm(xq, w, xs, ws, bias, torch.float32)) < MAX_REL_ERR[torch.float32]
    # one row: exact products in fp32, so close to the CPU reference; more rows: the MMA's
    want = quantize_fp8_gemm_ref(x.cpu(), w.cpu(), ws.cpu(), bias.cpu(), torch.float32)
    assert rel_err(fused.cpu(), want) < (1e-5 if m == 1 else MAX_REL_ERR[torch.float32])


@pytest.mark.parametrize("k", [14336, 769])
@pytest.mark.parametrize("m", [1, 3])
def test_silu_mul_fp8_gemm_is_silu_mul_quant_then_gemm(m, k):
    # kernels/silu_mul_fp8_gemm.py: one row spreads SiLU·mul over programs that store partial
    # amaxes, then the quantizing GEMV takes their max: the same e4m3 values as silu_mul_quant_fp8
    n = 4096
    gate, up = (torch.randn(m, 2 * k, device="cuda") * 3).to(torch.bfloat16).chunk(2, dim=1)
    _, w, _, ws = inputs(m, n, k, "token_channel")
    fused = silu_mul_fp8_gemm(gate, up, w, ws, None, torch.float32)
    hq, hs = silu_mul_quant_fp8(gate, up, None)
    assert rel_err(fused, fp8_gemm(hq, w, hs, ws, None, torch.float32)) < MAX_REL_ERR[torch.float32]
    want = silu_mul_fp8_gemm_ref(gate.cpu(), up.cpu(), w.cpu(), ws.cpu(), None, torch.float32)
    assert rel_err(fused.cpu(), want) < (1e-5 if m == 1 else MAX_REL_ERR[torch.float32])
