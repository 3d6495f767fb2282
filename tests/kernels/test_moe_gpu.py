"""The MoE kernels compiled for the GPU at real model shapes (Mixtral-8x7B, Qwen3-30B-A3B,
DeepSeek-V2-Lite, DeepSeek-V3 routing), against their references run on the same GPU.
Skipped in CI (CPU, interpreter); run on a GPU with

    TRITON_INTERPRET=0 python -m pytest -q tests/kernels/test_moe_gpu.py
"""
import os

import pytest
import torch

from trtllm.kernels.fused_moe import MoeConfig, fused_moe, fused_moe_ref, fused_moe_triton
from trtllm.kernels.moe_align import moe_align, moe_align_ref
from trtllm.kernels.moe_routing import moe_routing, moe_routing_ref

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(),
    reason="needs a GPU without the Triton interpreter")

# fused_moe vs the fp32 reference: the kernel rounds h and each expert's output to bf16.
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}

# (name, hidden, intermediate, experts, top_k)
MOE_SHAPES = [
    ("mixtral-8x7b", 4096, 14336, 8, 2),
    ("qwen3-30b-a3b", 2048, 768, 128, 8),
    ("deepseek-v2-lite", 2048, 1408, 64, 6),
]


def routing_kwargs(experts, grouped):
    if grouped:  # DeepSeek-V3
        return dict(scoring="sigmoid", renormalize=True, n_group=8, topk_group=4,
                    e_score_correction_bias=torch.randn(experts, device="cuda") * 0.05,
                    routed_scaling_factor=2.5)
    return dict(scoring="softmax", renormalize=True)


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 77, 8192])
@pytest.mark.parametrize("experts,top_k,grouped", [(8, 2, False), (128, 8, False), (256, 8, True)])
def test_routing(tokens, experts, top_k, grouped, logits_dtype):
    logits = (torch.randn(tokens, experts, device="cuda") * 2).to(logits_dtype)
    kw = routing_kwargs(experts, grouped)
    weights, ids = moe_routing(logits, top_k, **kw)
    ref_weights, ref_ids = moe_routing_ref(logits, top_k, **kw)
    # exp/sigmoid may differ from torch's in the last bit: a near-tie may then pick another
    # expert. Allow that on a few rows only, and require the rest to match exactly.
    same = (ids == ref_ids).all(dim=1)
    assert (~same).sum() <= max(1, tokens // 1000), f"{int((~same).sum())} of {tokens} rows differ"
    torch.testing.assert_close(weights[same], ref_weights[same], atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 128, 8), (4096, 128, 8), (8192, 256, 8), (300, 8, 2)])
@pytest.mark.parametrize("block_m", [16, 64])
def test_align(tokens, experts, top_k, block_m):
    ids = torch.rand(tokens, experts, device="cuda").argsort(dim=-1)[:, :top_k].to(torch.int32)
    for got, want in zip(moe_align(ids, experts, block_m), moe_align_ref(ids, experts, block_m), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 16, 769])
@pytest.mark.parametrize("name,hidden,inter,experts,top_k", MOE_SHAPES)
def test_fused_moe(name, hidden, inter, experts, top_k, tokens, dtype):
    if dtype == torch.float32 and name == "mixtral-8x7b":
        pytest.skip("fp32 Mixtral experts: 11 GB of weights for no new code path")
    x = torch.randn(tokens, hidden, device="cuda").to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda") / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device="cuda") / inter**0.5).to(dtype)
    weights, ids = moe_routing(torch.randn(tokens, experts, device="cuda"), top_k)
    out = fused_moe(x, w13, w2, weights, ids)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, weights, ids), **TOLERANCES[dtype])


@pytest.mark.parametrize("config", [MoeConfig(16, 64, 128, 4, 4), MoeConfig(64, 128, 64, 4, 3),
                                    MoeConfig(128, 128, 64, 8, 3)])
def test_fused_moe_configs(config):
    """Every tile shape the config function may pick (and a larger one) on one shape."""
    hidden, inter, experts, top_k, tokens = 2048, 768, 128, 8, 333
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda") / hidden**0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, device="cuda") / inter**0.5).bfloat16()
    weights, ids = moe_routing(torch.randn(tokens, experts, device="cuda"), top_k)
    out = fused_moe_triton(x, w13, w2, weights, ids, config=config)
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, weights, ids), **TOLERANCES[torch.bfloat16])


def test_fused_moe_in_cuda_graph():
    """Sizes depend on shapes only: the op captures and replays with new routing."""
    hidden, inter, experts, top_k, tokens = 2048, 768, 128, 8, 4
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda") / hidden**0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, device="cuda") / inter**0.5).bfloat16()
    logits = torch.randn(tokens, experts, device="cuda")
    fused_moe(x, w13, w2, *moe_routing(logits, top_k))  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, *moe_routing(logits, top_k))
    logits.copy_(torch.randn(tokens, experts, device="cuda"))
    graph.replay()
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, *moe_routing_ref(logits, top_k)),
                               **TOLERANCES[torch.bfloat16])
