import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.passes.graph_capture import Captured
from trtllm.passes.fuse_parallel_linears import fuse_parallel_linears
from trtllm.passes.fuse_rotary import fuse_rotary
from trtllm.passes.fuse_silu_mul import fuse_silu_mul
from trtllm.passes.split_heads_from_fused import split_heads_from_fused


def rotate_half(x):  # transformers' form
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):  # q/k [B, H, S, D], cos/sin [B, S, D]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def test_rotary_fuses_q_and_k():
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    cos, sin = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    cap = Captured(apply_rope, q, k, cos, sin)
    assert cap.apply(fuse_rotary) == 2
    assert cap.count(torch.ops.trtllm.rotary.default) == 2
    assert not any(n.target is torch.cat for n in cap.gm.graph.nodes)
    for got, want in zip(cap.run(), apply_rope(q, k, cos, sin)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rotary_over_other_layout_is_left_with_a_warning():
    def rope_bshd(q, cos, sin):  # q [B, S, H, D], cos unsqueezed over dim 2
        return q * cos.unsqueeze(2) + rotate_half(q) * sin.unsqueeze(2)

    q, cos, sin = torch.randn(2, 7, 4, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    cap = Captured(rope_bshd, q, cos, sin)
    with pytest.warns(UserWarning, match="rotate-half"):
        assert cap.apply(fuse_rotary) == 0
    torch.testing.assert_close(cap.run(), rope_bshd(q, cos, sin))


def test_silu_mul_fuses_gated_mlp_but_not_other_products():
    def f(gate, up, other):
        return F.silu(gate) * up + torch.sigmoid(gate) * other

    gate, up, other = torch.randn(5, 769), torch.randn(5, 769), torch.randn(5, 769)
    cap = Captured(f, gate, up, other)
    assert cap.apply(fuse_silu_mul) == 1
    assert cap.count(torch.ops.trtllm.silu_mul.default) == 1
    assert not any(n.target is F.silu for n in cap.gm.graph.nodes)
    torch.testing.assert_close(cap.run(), f(gate, up, other), rtol=1e-5, atol=1e-5)


class QKV(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(32, n, bias=bias) for n in (64, 16, 16))
        self.other = nn.Linear(64, 8)  # reads a different input: not fused

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return self.other(q) .sum(-1) + k.sum(-1) * v.sum(-1)


@pytest.mark.parametrize("bias", [False, True])
def test_parallel_linears_become_one(bias):
    model = QKV(bias).eval()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = model(x)
    cap = Captured(model, x)
    assert cap.apply(fuse_parallel_linears) == 1
    linears = [n for n in cap.gm.graph.nodes if n.target is torch._C._nn.linear]
    assert len(linears) == 2  # the fused q/k/v and `other`
    fused = cap.inputs.constants[0]
    assert fused.shape == (96, 32)
    torch.testing.assert_close(cap.run(), expected, rtol=1e-5, atol=1e-5)


def test_linears_with_mixed_bias_are_not_fused():
    a, b = nn.Linear(8, 8, bias=True), nn.Linear(8, 8, bias=False)
    x = torch.randn(2, 8)
    cap = Captured(lambda x: a(x) + b(x), x)
    assert cap.apply(fuse_parallel_linears) == 0


class Heads(nn.Module):
    """q viewed as heads twice (-1 and explicit), k as heads and as a whole, v as a whole."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(32, n) for n in (64, 16, 16))

    def forward(self, x):  # x [B, S, 32]
        b, s, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        q4, q4b, k4 = q.view(b, s, -1, 8), q.reshape(b, s, 8, 8), k.view(b, s, 2, 8)
        return (q4 * q4b).sum((-1, -2)) + k4.transpose(1, 2).sum((1, -1)) + k.sum(-1) * v.sum(-1)


def test_parts_viewed_as_heads_are_narrowed_from_the_heads_of_the_whole():
    """A view of a narrowed part asks whether the token count is 1 (its strides depend on it),
    so a dynamic token dim would not serve one token: views split into heads read a narrow of
    the fused output unflattened into heads; other uses keep the plain narrow."""
    model = Heads().eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = model(x)
    cap = Captured(model, x)
    assert cap.apply(fuse_parallel_linears) == 1
    assert cap.apply(split_heads_from_fused) == 2  # q (viewed twice), k
    assert cap.count(torch.unflatten) == 1
    narrows = [n for n in cap.gm.graph.nodes if n.target is torch.narrow]
    assert sorted(n.args[1] for n in narrows) == [-2, -2, -1, -1]  # q and k as heads; k and v whole
    assert not [n for n in cap.gm.graph.nodes if n.op == "call_method" and n.target in ("view", "reshape")
                and n.args[0].target is torch.narrow]
    torch.testing.assert_close(cap.run(), expected, rtol=1e-5, atol=1e-5)
