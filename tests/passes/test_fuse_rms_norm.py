import pytest
import torch
import torch.nn as nn

from tests.passes.graph_capture import Captured
from trtllm.passes.fuse_add_rms_norm import fuse_add_rms_norm
from trtllm.passes.fuse_norm_add_rms_norm import fuse_norm_add_rms_norm
from trtllm.passes.fuse_rms_norm import fuse_rms_norm


class HFRMSNorm(nn.Module):  # transformers' LlamaRMSNorm, verbatim
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class Block(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm1, self.norm2 = HFRMSNorm(n), HFRMSNorm(n)

    def forward(self, x, residual):
        h = x + residual
        return self.norm2(self.norm1(h) * 2) + h


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_and_residual_add_fuse(dtype):
    block = Block(83).to(dtype)
    x, r = torch.randn(3, 5, 83, dtype=dtype), torch.randn(3, 5, 83, dtype=dtype)
    with torch.no_grad():
        expected = block(x, r)
    cap = Captured(block, x, r)
    assert cap.count(torch.ops.trtllm.rms_norm.default) == 0
    assert cap.apply(fuse_rms_norm) == 2
    assert cap.count(torch.ops.trtllm.rms_norm.default) == 2
    assert not any(n.target is torch.rsqrt for n in cap.gm.graph.nodes)
    assert cap.apply(fuse_add_rms_norm) == 1
    assert cap.count(torch.ops.trtllm.fused_add_rms_norm.default) == 1
    assert cap.count(torch.ops.trtllm.rms_norm.default) == 1
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(cap.run(), expected, rtol=tol, atol=tol)


def test_l2_norm_is_not_an_rms_norm():
    def l2_norm(x, w):  # no mean: must stay as it is, with a warning naming the rsqrt
        return w * (x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6))

    x, w = torch.randn(4, 16), torch.randn(16)
    cap = Captured(l2_norm, x, w)
    with pytest.warns(UserWarning, match="rsqrt"):
        assert cap.apply(fuse_rms_norm) == 0
    torch.testing.assert_close(cap.run(), l2_norm(x, w))


def test_add_with_broadcast_is_not_fused():
    norm = HFRMSNorm(16)

    def f(x, bias):
        return norm(x + bias)

    x, bias = torch.randn(4, 16), torch.randn(16)
    cap = Captured(f, x, bias)
    assert cap.apply(fuse_rms_norm) == 1
    assert cap.apply(fuse_add_rms_norm) == 0
    torch.testing.assert_close(cap.run(), f(x, bias).detach(), rtol=1e-5, atol=1e-5)


class GemmaRMSNorm(nn.Module):  # transformers' GemmaRMSNorm, verbatim
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(0.1 * torch.randn(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class GemmaBlock(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm1, self.norm2 = GemmaRMSNorm(n), GemmaRMSNorm(n)

    def forward(self, x, residual):
        h = x + residual
        return self.norm2(self.norm1(h) * 2) + h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_unit_offset_norm_and_residual_add_fuse(dtype):
    block = GemmaBlock(83).to(dtype)
    x, r = torch.randn(3, 5, 83, dtype=dtype), torch.randn(3, 5, 83, dtype=dtype)
    with torch.no_grad():
        expected = block(x, r)
    cap = Captured(block, x, r)
    assert cap.apply(fuse_rms_norm) == 2
    norms = [n for n in cap.gm.graph.nodes if n.target is torch.ops.trtllm.rms_norm.default]
    assert [n.args[3] for n in norms] == [True, True]  # unit_offset
    assert not any(n.target is torch.rsqrt for n in cap.gm.graph.nodes)
    assert cap.apply(fuse_add_rms_norm) == 1
    fused, = [n for n in cap.gm.graph.nodes if n.target is torch.ops.trtllm.fused_add_rms_norm.default]
    assert fused.args[4] is True
    if dtype == torch.float32:
        torch.testing.assert_close(cap.run(), expected, rtol=1e-5, atol=1e-5)
    else:  # the interpreter's bf16 (registry.interpreter_upcast) skips the sum's rounding: an ulp or two
        torch.testing.assert_close(cap.run(), expected, rtol=2e-2, atol=3e-2)


class GemmaSandwich(nn.Module):
    """Gemma-2/3's decoder-layer chain: the block output's norm, the residual add, the next input norm."""
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.post_norm, self.pre_norm = GemmaRMSNorm(n, eps), GemmaRMSNorm(n, eps)

    def forward(self, attn_out, residual):
        h = residual + self.post_norm(attn_out)
        return self.pre_norm(h) * 3, h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_sandwich_norms_fuse(dtype):
    block = GemmaSandwich(83).to(dtype)
    x, r = torch.randn(3, 5, 83, dtype=dtype), torch.randn(3, 5, 83, dtype=dtype)
    with torch.no_grad():
        expected = block(x, r)
    cap = Captured(block, x, r)
    assert cap.apply(fuse_rms_norm) == 2
    assert cap.apply(fuse_add_rms_norm) == 1
    assert cap.apply(fuse_norm_add_rms_norm) == 1
    targets = [n.target for n in cap.gm.graph.nodes]
    assert torch.ops.trtllm.norm_add_rms_norm.default in targets
    assert torch.ops.trtllm.rms_norm.default not in targets and torch.ops.trtllm.fused_add_rms_norm.default not in targets
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    for got, want in zip(cap.run(), expected):
        torch.testing.assert_close(got, want, **tol)


def test_a_norm_with_another_user_is_not_fused_into_the_add():
    class TwoUses(GemmaSandwich):
        def forward(self, attn_out, residual):
            n = self.post_norm(attn_out)
            h = residual + n
            return self.pre_norm(h) + n

    cap = Captured(TwoUses(83), torch.randn(5, 83), torch.randn(5, 83))
    cap.apply(fuse_rms_norm)
    assert cap.apply(fuse_add_rms_norm) == 1
    assert cap.apply(fuse_norm_add_rms_norm) == 0
