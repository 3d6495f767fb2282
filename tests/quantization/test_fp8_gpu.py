"""An FP8 model compiled on the GPU computes the FP8 semantics: a tiny Llama with
QuantConfig's per-channel x per-token weights, bf16 activations, through every FP8 pass
(quantize_linears, the norm and SiLU*mul quantizations fused into their producers) and both
fp8_gemm paths (torch._scaled_mm above 16 rows on sm_90, the weight-streaming kernel in the
decode graphs), against the same model emulated in fp32 on the CPU (dequantized weights,
inputs quantized and dequantized). Skipped in CI; on an H100/H200:

    TRITON_INTERPRET=0 python -m pytest -q tests/quantization/test_fp8_gpu.py
"""
import dataclasses
import os
import re

import pytest
import torch
import torch.nn as nn

import trtllm
from tests.models.checkpoints import write_checkpoint
from tests.quantization.fp8_checkpoints import fake_quantize_input
from trtllm.config import QuantAlgo

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
    or torch.cuda.get_device_capability() < (8, 9),
    reason="needs an sm_89+ GPU without the Triton interpreter")

# ||logits - emulated|| / ||emulated||: bf16 activations against fp32 ones, and each
# activation that bf16 rounding moves across an e4m3 rounding boundary (a 2^-3 step for
# about one value in 2^5) lands a step away. The same test run on the CPU (interpreter,
# bf16) gave 0.076 (the plain bf16 model against fp32: 0.014); a wrong scale, a swapped
# gate/up or a garbled GEMM path gives O(1).
MAX_REL_ERR = 0.12


def test_fp8_model_on_the_gpu_matches_its_fp32_emulation(tmp_path):
    algo = QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN
    path = write_checkpoint("llama31", tmp_path, vocab_size=256)
    model = trtllm.load_model(path, dtype=torch.bfloat16, device="cuda", quant_algo=algo)
    reference = trtllm.load_model(path, dtype=torch.float32, device="cpu")
    for name, q in trtllm.quantization.fp8_linears_of(model).linears.items():
        reference.get_submodule(name).weight = nn.Parameter(q.dequantized().cpu())
        q_cpu = dataclasses.replace(q, weight=q.weight.cpu(), weight_scale=q.weight_scale.cpu(), placeholder=None)
        reference.get_submodule(name).register_forward_pre_hook(
            lambda m, a, q=q_cpu: (fake_quantize_input(a[0], q),))
    compiled = trtllm.compile(model)
    ids = torch.randint(0, 256, (1, 40))
    positions = torch.arange(40)[None]
    with torch.no_grad():
        expected = reference(ids, positions).float()
        whole = compiled(ids.cuda(), positions.cuda()).float().cpu()  # 40 rows: _scaled_mm on sm_90
        with compiled.decode_graphs():
            decode = compiled(ids[:, :4].cuda(), positions[:, :4].cuda()).float().cpu()  # the GEMV path
            one = compiled(ids[:, :1].cuda(), positions[:, :1].cuda()).float().cpu()  # quantizing GEMVs
    summary = compiled.summary()  # compilation is lazy: after the first call
    ops = {name: int(n) for name, n in re.findall(r"(trtllm\.\w+): (\d+)", summary.split("in decode graphs")[0])}
    # a layer: 4 GEMMs, o_proj's input quantized alone, the MLP product quantized in its kernel
    assert ops["trtllm.fp8_gemm"] == 4 * ops["trtllm.quantize_fp8"] == 4 * ops["trtllm.silu_mul_quant_fp8"] > 0
    assert "trtllm.silu_mul" not in ops, summary
    for got, want in ((whole, expected), (decode, expected[:, :4]), (one, expected[:, :1])):
        assert torch.isfinite(got).all()
        assert ((got - want).norm() / want.norm()).item() < MAX_REL_ERR


@pytest.mark.parametrize("layout, granularity", [("modelopt", "tensor"), ("compressed_tensors", "channel")])
def test_static_scale_checkpoint_on_the_gpu_matches_its_fp32_emulation(tmp_path, layout, granularity):
    """A checkpoint with static input scales (ModelOpt FP8; trtllm-build's static per-channel):
    the norms and SiLU*mul quantize with the checkpoint's scale in their kernels, o_proj's input
    through trtllm.quantize_fp8_static; in the decode graphs o_proj's and down_proj's GEMVs
    quantize by it (one row: the kernel's STATIC mode)."""
    from tests.quantization.fp8_checkpoints import fp8_reference, write_fp8_checkpoint

    src = write_checkpoint("llama31", tmp_path / "src", vocab_size=512)  # CALIBRATION ids reach 400
    linears = write_fp8_checkpoint(src, tmp_path / "fp8", layout, granularity, True)
    reference = fp8_reference(src, linears)
    compiled = trtllm.compile(trtllm.load_model(tmp_path / "fp8", dtype=torch.bfloat16, device="cuda"))
    ids = torch.randint(0, 256, (1, 40))
    positions = torch.arange(40)[None]
    with torch.no_grad():
        expected = reference(ids).logits.float()
        whole = compiled(ids.cuda(), positions.cuda()).float().cpu()
        with compiled.decode_graphs():
            decode = compiled(ids[:, :4].cuda(), positions[:, :4].cuda()).float().cpu()
            one = compiled(ids[:, :1].cuda(), positions[:, :1].cuda()).float().cpu()  # o_proj's GEMV quantizes
    summary = compiled.summary()
    ops = {name: int(n) for name, n in re.findall(r"(trtllm\.\w+): (\d+)", summary.split("in decode graphs")[0])}
    layers = ops["trtllm.fp8_gemm"] // 4  # one per layer and compiled graph
    assert layers > 0 and ops["trtllm.quantize_fp8_static"] == ops["trtllm.silu_mul_quant_fp8"] == layers, summary
    assert "trtllm.quantize_fp8" not in ops and "trtllm.silu_mul" not in ops, summary
    assert (f"in decode graphs instead: trtllm.fp8_gemm: {2 * layers}, trtllm.quantize_fp8_gemm: {layers}, "
            f"trtllm.silu_mul_fp8_gemm: {layers}") in summary
    for got, want in ((whole, expected), (decode, expected[:, :4]), (one, expected[:, :1])):
        assert torch.isfinite(got).all()
        assert ((got - want).norm() / want.norm()).item() < MAX_REL_ERR
