"""fuse_add_rms_norm_gemv: in decode graphs the residual add + norm goes into the GEMV it feeds
(bf16 linears and FP8 GEMMs, per-token and static scales); what it cannot take stays."""
import pytest
import torch
import torch.nn as nn

import trtllm
from tests.passes.graph_capture import Captured
from tests.passes.test_quantize_linears import GEMM, Block, _emulated, _quantized_block, _rel
from trtllm.config import QuantAlgo
from trtllm.passes.fuse_add_rms_norm import fuse_add_rms_norm
from trtllm.passes.fuse_add_rms_norm_gemv import fuse_add_rms_norm_gemv
from trtllm.passes.fuse_parallel_linears import fuse_parallel_linears
from trtllm.passes.fuse_rms_norm import fuse_rms_norm
from trtllm.passes.fuse_rms_norm_quant_fp8 import fuse_rms_norm_quant_fp8
from trtllm.passes.fuse_silu_mul import fuse_silu_mul
from trtllm.passes.fuse_silu_mul_quant_fp8 import fuse_silu_mul_quant_fp8
from trtllm.passes.quantize_linears import quantize_linears
from trtllm.passes.use_gemv_linear import use_gemv_linear
from trtllm.quantization import quantize_model

NORM, NORM_FP8 = torch.ops.trtllm.fused_add_rms_norm.default, torch.ops.trtllm.fused_add_rms_norm_quant_fp8.default
FUSED, FUSED_FP8 = torch.ops.trtllm.add_rms_norm_linear.default, torch.ops.trtllm.add_rms_norm_fp8_gemm.default
NORM_PASSES = (fuse_rms_norm, fuse_add_rms_norm, fuse_rms_norm_quant_fp8, fuse_silu_mul, fuse_silu_mul_quant_fp8)


def test_the_norm_before_gate_up_goes_into_its_gemv():
    """A Block at one token: q/k/v's norm has no residual add (stays); the one before gate/up
    (stacked by fuse_parallel_linears) becomes add_rms_norm_linear, same output in fp32."""
    block = Block(bias=True).eval()
    x = torch.randn(1, 1, 128)
    cap = Captured(block, x)
    assert cap.apply(fuse_parallel_linears) == 2
    for fuse in (*NORM_PASSES, use_gemv_linear):
        cap.apply(fuse)
    before = cap.run()
    assert cap.count(NORM) == 1
    assert cap.apply(fuse_add_rms_norm_gemv) == 1
    assert cap.count(NORM) == 0 and cap.count(FUSED) == 1
    torch.testing.assert_close(cap.run(), before, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(cap.run(), block(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("algo", [QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, QuantAlgo.FP8_BLOCK_SCALES])
def test_fp8_norms_go_into_their_gemms_but_not_block_scaled_ones(algo):
    cap, emulated, x = _quantized_block(algo)
    for fuse in NORM_PASSES:
        cap.apply(fuse)
    assert cap.count(NORM_FP8) == 1
    block_scaled = algo == QuantAlgo.FP8_BLOCK_SCALES
    assert cap.apply(fuse_add_rms_norm_gemv) == (0 if block_scaled else 1)
    assert cap.count(NORM_FP8) == (1 if block_scaled else 0) and cap.count(FUSED_FP8) == (0 if block_scaled else 1)
    with torch.no_grad():
        assert _rel(cap.run(), emulated(x)) < 1e-3


def test_a_static_scale_goes_with_the_norm_into_the_gemm():
    block = Block().eval()
    fp8 = quantize_model(block, QuantAlgo.FP8)
    for name, q in fp8.linears.items():
        q.input_scale = torch.tensor([0.01 if name in ("q", "k", "v") else 0.02])  # gate and up share one
    emulated, _ = _emulated(block, fp8)
    x = torch.randn(1, 1, 128)
    cap = Captured(block, x)
    cap.ctx.quantization = fp8
    cap.apply(quantize_linears)
    for fuse in NORM_PASSES:
        cap.apply(fuse)
    gemms = cap.count(GEMM)
    assert cap.apply(fuse_add_rms_norm_gemv) == 1
    (fused,) = [n for n in cap.gm.graph.nodes if n.target is FUSED_FP8]
    assert fused.kwargs["input_scale"] is not None and cap.count(GEMM) == gemms - 1
    with torch.no_grad():
        assert _rel(cap.run(), emulated(x)) < 1e-5


def test_a_norm_that_also_feeds_another_op_is_left_alone():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.proj = nn.RMSNorm(128, eps=1e-5), nn.Linear(128, 64)

        def forward(self, x, r):
            h = Block.rms(self.norm, x + r)
            return self.proj(h) + h[..., :64]

    cap = Captured(Reused().eval(), torch.randn(1, 1, 128), torch.randn(1, 1, 128))
    for fuse in (fuse_rms_norm, fuse_add_rms_norm, use_gemv_linear):
        cap.apply(fuse)
    assert cap.count(NORM) == 1
    assert cap.apply(fuse_add_rms_norm_gemv) == 0


@pytest.mark.parametrize("family", ["llama31", "gemma", "gemma3"])
def test_the_compiled_models_decode_graphs_fuse_every_residual_norm(family, tmp_path):
    """A 2-layer checkpoint compiled: its decode-graph variant fuses the three norms that follow a
    residual add (the first layer's input norm has none; Gemma-3's are sandwich norms, Gemma's
    add 1 to the weight), and one token's logits match the whole-sequence call's."""
    from tests.models.checkpoints import write_checkpoint

    model = trtllm.load_model(write_checkpoint(family, tmp_path), dtype=torch.float32, device="cpu")
    compiled = trtllm.compile(model)
    ids, positions = torch.tensor([[5]]), torch.tensor([[3]])
    whole = compiled(ids, positions)
    with compiled.decode_graphs():
        decode = compiled(ids, positions)
    assert [v.matches.get("fuse_add_rms_norm_gemv", 0) for v in compiled.variants] == [3, 0]
    fused = [n for gm in compiled.variants[0].graphs for n in gm.graph.nodes if n.target is FUSED]
    assert [("pre_weight" in n.kwargs, n.args[4]) for n in fused] == [(family == "gemma3", family != "llama31")] * 3
    torch.testing.assert_close(decode, whole, atol=1e-5, rtol=1e-5)
