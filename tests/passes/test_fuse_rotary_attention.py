"""fuse_rotary_attention: the q/k ropes of a layer go into its paged attention op."""
import pytest
import torch
import torch.nn.functional as F

from tests.passes.graph_capture import Captured
from tests.passes.test_fuse_rotary_silu_linears import apply_rope, rotate_half
from trtllm.attention_context import whole_sequences_context
from trtllm.passes.fuse_rotary import fuse_rotary
from trtllm.passes.fuse_rotary_attention import fuse_rotary_attention
from trtllm.passes.replace_sdpa_with_paged_attention import replace_sdpa_with_paged_attention

B, S, HQ, HKV, D = 2, 7, 4, 2, 16


def rope_attention(q, k, v, cos, sin):  # q [B, Hq, S, D], k/v [B, Hkv, S, D], cos/sin [B, S, D]
    q, k = apply_rope(q, k, cos, sin)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def rope_attention_reading_k(q, k, v, cos, sin):  # the rotated k read by something else too
    q, k = apply_rope(q, k, cos, sin)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), k.sum()


def rope_attention_other_tables(q, k, v, cos, sin):  # k rotated by other positions' tables
    q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
    k = k * cos.flip(1).unsqueeze(1) + rotate_half(k) * sin.flip(1).unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def inputs(dtype=torch.float32):
    q, k, v = torch.randn(B, HQ, S, D, dtype=dtype), torch.randn(B, HKV, S, D, dtype=dtype), \
        torch.randn(B, HKV, S, D, dtype=dtype)
    angles = torch.arange(S)[:, None] * (10000.0 ** (-torch.arange(0, D, 2) / D))[None, :]
    emb = torch.cat((angles, angles), -1)[None].expand(B, S, D)
    return q, k, v, emb.cos().to(dtype), emb.sin().to(dtype)


def run(cap, dtype):
    with whole_sequences_context(B, S, 16, 1, HKV, D, dtype, "cpu"):
        return cap.run()


def captured(fn, args):
    cap = Captured(fn, *args)
    assert cap.apply(replace_sdpa_with_paged_attention) == 1 and cap.apply(fuse_rotary) == 2
    return cap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ropes_join_attention(dtype):
    args = inputs(dtype)
    cap = captured(rope_attention, args)
    unfused = run(cap, dtype)
    assert cap.apply(fuse_rotary_attention) == 1
    assert cap.count(torch.ops.trtllm.rotary.default) == 0
    (attn,) = [n for n in cap.gm.graph.nodes if n.target is torch.ops.trtllm.attention.default]
    assert attn.args[0].name.startswith("l_q") and attn.args[1].name.startswith("l_k"), attn.args
    fused = run(cap, dtype)
    atol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(fused, unfused, atol=atol, rtol=atol)
    with torch.no_grad():
        eager = rope_attention(*args)
    torch.testing.assert_close(fused, eager, atol=atol, rtol=atol)
    assert cap.apply(fuse_rotary_attention) == 0  # an attention that carries its rope is left alone


@pytest.mark.parametrize("fn", [rope_attention_reading_k, rope_attention_other_tables])
def test_ropes_stay_where_attention_cannot_take_them(fn):
    args = inputs()
    cap = captured(fn, args)
    before = run(cap, torch.float32)
    assert cap.apply(fuse_rotary_attention) == 0
    assert cap.count(torch.ops.trtllm.rotary.default) == 2
    with torch.no_grad():
        torch.testing.assert_close(before, fn(*args), atol=1e-5, rtol=1e-5)
