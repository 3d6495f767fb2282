import pytest
import torch
import torch.nn as nn

from tests.passes.graph_capture import Captured
from tests.passes.test_fuse_rms_norm import GemmaRMSNorm, HFRMSNorm
from tests.passes.test_fuse_rotary_silu_linears import apply_rope
from trtllm.passes.fuse_rms_norm import fuse_rms_norm
from trtllm.passes.fuse_rms_norm_rotary import fuse_rms_norm_rotary
from trtllm.passes.fuse_rotary import fuse_rotary

H, KVH, D = 4, 2, 16


class QKNormAttention(nn.Module):
    """q/k projections, QK-norm and rope as the models write them:
    "qwen3": HF Qwen3 and our model files, norm then transpose;
    "gemma3": HF Gemma-3, transpose then norm (Gemma's (1 + w) weight);
    "flat": heads flattened into the rows for the norm, a view back to [B, S, H, D] after it."""

    def __init__(self, layout: str, extra_user: bool = False):
        super().__init__()
        self.layout, self.extra_user = layout, extra_user
        self.q_proj, self.k_proj = nn.Linear(32, H * D), nn.Linear(32, KVH * D)
        norm = GemmaRMSNorm if layout == "gemma3" else HFRMSNorm
        self.q_norm, self.k_norm = norm(D), norm(D)

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        q, k = self.q_proj(x).view(B, S, -1, D), self.k_proj(x).view(B, S, -1, D)
        if self.layout == "qwen3":
            q, k = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2)
        elif self.layout == "gemma3":
            q, k = self.q_norm(q.transpose(1, 2)), self.k_norm(k.transpose(1, 2))
        else:
            q = self.q_norm(q.view(B * S, H, D)).view(B, S, H, D).transpose(1, 2)
            k = self.k_norm(k.reshape(B * S, KVH, D)).reshape(B, S, KVH, D).transpose(1, 2)
        extra = q.sum() if self.extra_user else None  # a second reader of q's norm
        q, k = apply_rope(q, k, cos, sin)
        return (q, k) if extra is None else (q, k, extra)


def _captured(model, dtype):
    model = model.to(dtype).eval()
    x = torch.randn(2, 7, 32, dtype=dtype)
    cos, sin = torch.randn(2, 7, D, dtype=dtype), torch.randn(2, 7, D, dtype=dtype)
    with torch.no_grad():
        expected = model(x, cos, sin)
    cap = Captured(model, x, cos, sin)
    assert cap.apply(fuse_rms_norm) == 2 and cap.apply(fuse_rotary) == 2
    return cap, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["qwen3", "gemma3", "flat"])
def test_qk_norm_joins_rope(layout, dtype):
    cap, expected = _captured(QKNormAttention(layout), dtype)
    assert cap.apply(fuse_rms_norm_rotary) == 2
    assert cap.count(torch.ops.trtllm.rms_norm_rotary.default) == 2
    assert cap.count(torch.ops.trtllm.rms_norm.default) == 0 and cap.count(torch.ops.trtllm.rotary.default) == 0
    fused = [n for n in cap.gm.graph.nodes if n.target is torch.ops.trtllm.rms_norm_rotary.default]
    assert [n.args[3] for n in fused] == [layout == "gemma3"] * 2  # unit_offset
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for got, want in zip(cap.run(), expected):
        torch.testing.assert_close(got, want, **tol)


def test_a_norm_read_elsewhere_stays():
    cap, expected = _captured(QKNormAttention("qwen3", extra_user=True), torch.float32)
    assert cap.apply(fuse_rms_norm_rotary) == 1  # k only
    assert cap.count(torch.ops.trtllm.rms_norm.default) == 1 and cap.count(torch.ops.trtllm.rotary.default) == 1
    for got, want in zip(cap.run(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
