import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trtllm
from tests.passes.graph_capture import Captured
from trtllm.passes.fuse_parallel_linears import fuse_parallel_linears
from trtllm.passes.use_gemv_linear import use_gemv_linear

LINEAR = torch._C._nn.linear  # how dynamo's graph spells F.linear / nn.Linear
OP = torch.ops.trtllm.linear.default


class Block(nn.Module):
    """Attention-projection and MLP linears, with and without bias."""

    def __init__(self, h=64, bias=False):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(h, n, bias=bias) for n in (64, 32, 32))
        self.o = nn.Linear(64, h, bias=True)
        self.gate, self.up = nn.Linear(h, 83, bias=False), nn.Linear(h, 83, bias=False)
        self.down = nn.Linear(83, h, bias=False)

    def forward(self, x):
        x = x + self.o(self.q(x) * self.k(x).repeat(1, 1, 2) + self.v(x).repeat(1, 1, 2))
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [3, 20])  # the GEMV's rows, and more than it takes (F.linear)
def test_every_linear_becomes_trtllm_linear(dtype, tokens):
    block = Block(bias=dtype == torch.float32).to(dtype).eval()
    x = torch.randn(1, tokens, 64, dtype=dtype)
    with torch.no_grad():
        expected = block(x)
    cap = Captured(block, x)
    assert cap.count(LINEAR) == 7 and cap.count(OP) == 0
    assert cap.apply(fuse_parallel_linears) == 2  # q/k/v and gate/up
    assert cap.count(LINEAR) == 4
    assert cap.apply(use_gemv_linear) == 4
    assert cap.count(LINEAR) == 0 and cap.count(OP) == 4
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(cap.run(), expected, **tol)


class Conv1DStyle(nn.Module):
    """Weights stored [K, N] (GPT-2's Conv1D): an addmm, and a linear over `W.t()`."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(64, 83)), nn.Parameter(torch.randn(83))
        self.w2 = nn.Parameter(torch.randn(83, 16))
        self.w3 = nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        h = torch.addmm(self.b1, x.view(-1, 64), self.w1)  # a matmul, not F.linear
        h = F.linear(h, self.w2.t())  # weight computed in the graph: not contiguous [N, K]
        return F.linear(h, self.w3) + (h @ self.w3.t()).sum()


def test_only_linears_over_contiguous_input_weights_match():
    model = Conv1DStyle()
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    cap = Captured(model, x)
    assert cap.count(LINEAR) == 2
    with pytest.warns(UserWarning, match="stays F.linear.*computed in the graph"):
        assert cap.apply(use_gemv_linear) == 1  # only F.linear(h, w3)
    assert cap.count(LINEAR) == 1 and cap.count(OP) == 1
    assert cap.count(torch.addmm) == 1
    torch.testing.assert_close(cap.run(), expected, rtol=1e-5, atol=1e-5)


def test_the_pass_serves_only_small_decode_graphs():
    from tests.test_compile import hf_model

    model = hf_model("llama")
    ids, positions = torch.randint(0, 96, (1, 5)), torch.arange(5)[None]
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits[0, [4]]
    rows = torch.tensor([4])
    compiled = trtllm.compile(model)
    decode, ordinary = compiled.variants
    # an ordinary call (prefill, mixed steps, large decode graphs): the passes without it
    torch.testing.assert_close(compiled(ids, positions, logits_indices=rows), expected, rtol=1e-4, atol=1e-5)
    assert compiled._serving is ordinary
    # the capture compiled both variants: the decode graphs' with it
    assert not _linears(ordinary.graphs) and _linears(decode.graphs) == 8  # 4 per layer
    summary = compiled.summary()
    assert "use_gemv_linear: 8" in summary and "in decode graphs instead: trtllm.linear: 8" in summary
    assert "lm head (outside the graph, on the chosen rows): trtllm.linear in decode graphs" in summary
    # the runner's decode-graph capture of <= GEMV_MAX_M tokens: the compilation with it
    with compiled.decode_graphs():
        got = compiled(ids, positions, logits_indices=rows)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert compiled._serving is decode
    # more tokens than the GEMV takes: the general compilation, even in decode graphs
    long_ids, long_pos = torch.randint(0, 96, (1, 20)), torch.arange(20)[None]
    with compiled.decode_graphs():
        compiled(long_ids, long_pos, logits_indices=torch.tensor([19]))
    assert compiled._serving is ordinary and compiled.captures == 1

    without = trtllm.compile(model, decode_graph_passes=[])
    with without.decode_graphs():
        torch.testing.assert_close(without(ids, positions, logits_indices=rows), expected, rtol=1e-4, atol=1e-5)
    assert "trtllm.linear" not in without.summary()


def _linears(graphs) -> int:
    return sum(n.target is OP for gm in graphs for n in gm.graph.nodes)
