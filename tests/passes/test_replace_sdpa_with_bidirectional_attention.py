"""compile_encoder's pass: a ViT's bidirectional SDPA -> trtllm.bidirectional_attention (counts
before/after, equal numerics, under Inductor too); what the kernel cannot express refused; the decoder's compile
keeps refusing non-causal attention."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trtllm
from trtllm.contract import CompileError
from trtllm.models.clip_vision import CLIPVisionConfig, CLIPVisionTower


def tiny_tower() -> CLIPVisionTower:
    torch.manual_seed(0)
    tower = CLIPVisionTower(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=28, patch_size=7))
    with torch.no_grad():
        for p in tower.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    return tower.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vit_attention_replaced_equal_numerics(dtype):
    tower = tiny_tower().to(dtype)
    encoder = trtllm.compile_encoder(tower)
    pixels = torch.randn(3, 3, 28, 28, dtype=dtype)
    with torch.no_grad():
        expected = tower(pixels, (2, 3))
    got = encoder(pixels, (2, 3))
    assert encoder.matches["replace_sdpa_with_bidirectional_attention"] == 3  # one per layer run
    ops = [n.target for gm in encoder.graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.trtllm.bidirectional_attention.default) == 3
    assert F.scaled_dot_product_attention not in ops
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **tol)
    # another batch size: the same graph (the batch dim is dynamic)
    encoder(torch.randn(5, 3, 28, 28, dtype=dtype), (2, 3))
    assert len(encoder.graphs) == 1
    assert "bidirectional_attention: 3" in encoder.summary()


def test_the_tower_under_inductor_equals_eager():
    """Under Inductor (compile_encoder's pipeline on a GPU) the tower still gives the eager
    module's output: the op's output, laid out [B, S, H, D], and the reshape after it compile
    right (that the fake's strides are the kernel's is test_opcheck's to check)."""
    tower = tiny_tower()
    encoder = trtllm.compile_encoder(tower, inductor=True)
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        expected = tower(pixels, (3,))[0]
    torch.testing.assert_close(encoder(pixels, (3,))[0], expected, atol=1e-5, rtol=1e-5)
    assert encoder.matches["replace_sdpa_with_bidirectional_attention"] == 3


class MaskedAttention(nn.Module):
    def forward(self, x):
        q = x.view(1, 2, -1, 4)
        mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


class CausalAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        q = (x * self.w).view(1, 2, -1, 4)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)


@pytest.mark.parametrize("module,message", [(MaskedAttention, "attn_mask"), (CausalAttention, "causal SDPA")])
def test_unsupported_attention_refused(module, message):
    m = module()
    if not list(m.parameters()):
        m.register_parameter("w", nn.Parameter(torch.ones(1)))
    with pytest.raises(CompileError, match=message):
        trtllm.compile_encoder(m)(torch.randn(2, 24))


def test_decoder_compile_still_refuses_bidirectional_attention():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 8)

        def forward(self, input_ids, positions):
            x = self.embed(input_ids)
            q = x.view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(x.shape)

    with pytest.raises(CompileError, match="non-causal SDPA"):
        trtllm.compile(Decoder())
