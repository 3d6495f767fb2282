"""GPU-only checks of kernels/add_rms_norm_gemv.py at Llama-3.1-8B's norm-fed shapes: the fused
one-row kernel against the two kernels it replaces (fused_add_rms_norm + linear's GEMV;
fused_add_rms_norm_quant_fp8 + fp8_gemm), compiled for the GPU, where the interpreter's
emulated roundings are the hardware's own. Skipped in CI (CPU, interpreter); run with

    TRITON_INTERPRET=0 python -m pytest -q tests/kernels/test_add_rms_norm_gemv_gpu.py
"""
import os

import pytest
import torch

from trtllm.kernels.add_rms_norm_gemv import NormGemvConfig, add_rms_norm_gemv
from trtllm.kernels.fp8_gemm import FP8_DTYPE, FP8_MAX, fp8_gemm
from trtllm.kernels.linear import linear_ref
from trtllm.kernels.rms_norm import fused_add_rms_norm
from trtllm.kernels.rms_norm_quant_fp8 import fused_add_rms_norm_quant_fp8

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
    or torch.cuda.get_device_capability() < (8, 9),
    reason="needs an sm_89+ GPU without the Triton interpreter")

SHAPES = [(6144, 4096), (28672, 4096), (1536, 1152)]  # qkv, gate_up; Gemma-3-1B's qkv (K not a power of 2)
# the default; a grid of blocks; a loop; a loop a block ahead
CONFIGS = [None, NormGemvConfig(1, 4, 0), NormGemvConfig(4, 8, 8), NormGemvConfig(2, 8, 4, True)]
# ||y - two kernels|| / ||two kernels||: the same e4m3 (or bf16) row, fp32 sums in another order
MAX_REL_ERR = 1e-5


def inputs(n, k, fp8):
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(1, k, device="cuda", dtype=torch.bfloat16) * 3
    nw = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    if fp8:
        w = (torch.randn(n, k, device="cuda") * 50).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return x, r, nw, w, torch.rand(n, 1, device="cuda") * 0.01 + 0.001
    return x, r, nw, torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5, None


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _fused(x, r, nw, w, ws, config, unit_offset=False, input_scale=None):
    kw = {} if config is None else {"config": config}
    out = torch.empty(1, w.shape[0], device="cuda", dtype=torch.float32)
    return add_rms_norm_gemv(x, r, nw, 1e-5, unit_offset, w, None, out, weight_scale=ws, input_scale=input_scale,
                             **kw)


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "grid", "loop", "prefetch"])
@pytest.mark.parametrize("n,k", SHAPES)
def test_bf16_is_the_two_kernels_output(n, k, config):
    x, r, nw, w, _ = inputs(n, k, fp8=False)
    y, s = _fused(x, r, nw, w, None, config)
    normed, summed = fused_add_rms_norm(x, r, nw, 1e-5)
    assert torch.equal(s, summed)
    assert _rel(y, linear_ref(normed.float(), w.float())) < MAX_REL_ERR


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=["default", "grid", "loop", "prefetch"])
@pytest.mark.parametrize("n,k", SHAPES)
def test_fp8_is_the_two_kernels_output(n, k, config, unit_offset):
    x, r, nw, w, ws = inputs(n, k, fp8=True)
    y, s = _fused(x, r, nw, w, ws, config, unit_offset)
    xq, xs, summed = fused_add_rms_norm_quant_fp8(x, r, nw, 1e-5, None, unit_offset)
    assert torch.equal(s, summed)
    assert _rel(y, fp8_gemm(xq, w, xs, ws, None, torch.float32)) < MAX_REL_ERR
    scale = (xs * 0.7).reshape(1)  # static, below the row's own: some values saturate
    y, _ = _fused(x, r, nw, w, ws, config, unit_offset, input_scale=scale)
    xq, _, _ = fused_add_rms_norm_quant_fp8(x, r, nw, 1e-5, None, unit_offset, scale)
    assert _rel(y, fp8_gemm(xq, w, scale, ws, None, torch.float32)) < MAX_REL_ERR
