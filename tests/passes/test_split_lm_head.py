"""split_lm_head: the head leaves the graph, with final logit soft-capping when the model
applies it (Gemma-2/3), and the LMHead handed back computes the same logits."""
import pytest
import torch
import torch.nn.functional as F

from tests.passes.graph_capture import Captured
from trtllm.passes.split_lm_head import split_lm_head

H, V = 16, 40


def capped_head(h, w):  # HF Gemma-2's order: divide, tanh, multiply
    logits = F.linear(h, w)
    logits = logits / 3.0
    logits = torch.tanh(logits)
    return logits * 3.0


def plain_head(h, w):
    return F.linear(h, w)


@pytest.mark.parametrize("fn, softcap", [(plain_head, 0.0), (capped_head, 3.0)])
def test_head_and_its_soft_capping_leave_the_graph(fn, softcap):
    h, w = torch.randn(2, 5, H) * 4, torch.randn(V, H)
    cap = Captured(fn, h, w)
    assert cap.apply(split_lm_head) == 1
    assert cap.ctx.lm_head.softcap == softcap
    assert not any(n.target in (torch.tanh, F.linear, torch._C._nn.linear) for n in cap.gm.graph.nodes)
    hidden = cap.run()
    torch.testing.assert_close(hidden, h)
    torch.testing.assert_close(cap.ctx.lm_head(hidden), fn(h, w), rtol=1e-6, atol=1e-6)
    if softcap:
        assert fn(h, w).abs().max() <= softcap < F.linear(h, w).abs().max()  # the cap bites


@pytest.mark.parametrize("fn", [
    lambda h, w: torch.tanh(F.linear(h, w) / 3.0) * 2.0,  # not a soft-cap: other factors
    lambda h, w: torch.tanh(F.linear(h, w)) * 3.0,
    lambda h, w: F.linear(h, w) * 3.0,  # a scale (Granite's logits_scaling is a division)
], ids=["two_caps", "no_divide", "scale"])
def test_other_tails_keep_the_head_in_the_graph(fn):
    h, w = torch.randn(2, 5, H), torch.randn(V, H)
    cap = Captured(fn, h, w)
    assert cap.apply(split_lm_head) == 0
    assert cap.ctx.lm_head is None
    torch.testing.assert_close(cap.run(), fn(h, w))
