"""passes/place_mla_attention.py: multi-head latent attention found in the captured graph,
HF's DeepseekV3Attention (new_empty + slice copies for the key) and a plain-PyTorch MLA
(torch.cat), replaced by trtllm.mla_attention with the expansion gone; numerics equal to the
eager model; an MLA the pass cannot read is refused by name."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trtllm
from tests.models.checkpoints import make_hf_model, random_batch
from trtllm.compile import CompileError


@dataclass
class Config:
    vocab_size: int = 64
    hidden: int = 48
    heads: int = 3
    kv_lora_rank: int = 16
    qk_rope_head_dim: int = 8
    qk_nope_head_dim: int = 12
    v_head_dim: int = 10
    num_layers: int = 2


class PlainMLA(nn.Module):
    """DeepSeek's attention written the obvious way (rope left out: the pass needs none)."""

    def __init__(self, c: Config, spelling: str = "cat"):
        super().__init__()
        self.c, self.spelling = c, spelling
        self.q_proj = nn.Linear(c.hidden, c.heads * (c.qk_nope_head_dim + c.qk_rope_head_dim), bias=False)
        self.kv_a_proj = nn.Linear(c.hidden, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(c.heads * c.v_head_dim, c.hidden, bias=False)

    def forward(self, x):  # x [B, S, hidden]
        c, (B, S, _) = self.c, x.shape
        dn, dr, dv, H = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.heads
        q = self.q_proj(x).view(B, S, H, dn + dr).transpose(1, 2)            # [B, H, S, dn + dr]
        q_nope, q_rope = torch.split(q, [dn, dr], dim=-1)
        latent, k_rope = torch.split(self.kv_a_proj(x), [c.kv_lora_rank, dr], dim=-1)
        latent, k_rope = latent.view(B, 1, S, -1), k_rope.view(B, 1, S, dr)   # one latent "head"
        kv = self.kv_b_proj(latent).view(B, S, H, dn + dv).transpose(1, 2)   # [B, H, S, dn + dv]
        k_nope, v = torch.split(kv, [dn, dv], dim=-1)
        if self.spelling == "cat":
            k = torch.cat([k_nope, k_rope.expand(-1, H, -1, -1)], dim=-1)
        else:  # the key from a second linear: not MLA as the pass reads it
            k = torch.cat([k_nope, k_nope[..., :dr]], dim=-1)
        out = F.scaled_dot_product_attention(torch.cat([q_nope, q_rope], dim=-1), k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * dv))


class PlainMLAModel(nn.Module):
    def __init__(self, c: Config, spelling: str = "cat"):
        super().__init__()
        self.config = c  # kv_lora_rank + qk_rope_head_dim: the probe's sign of MLA
        self.embed = nn.Embedding(c.vocab_size, c.hidden)
        self.layers = nn.ModuleList(PlainMLA(c, spelling) for _ in range(c.num_layers))
        self.head = nn.Linear(c.hidden, c.vocab_size, bias=False)

    def forward(self, input_ids, positions):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def count(compiled, op) -> int:  # in the ordinary calls' graphs (the decode graphs' are the same here)
    return sum(1 for gm in compiled.variants[-1].graphs for n in gm.graph.nodes if n.target is op)


def kv_b_linears(compiled) -> int:
    return sum(1 for gm in compiled.graphs for n in gm.graph.nodes
               if n.op == "call_function" and "kv_b_proj" in str(n.args[1:2]))


def test_plain_pytorch_mla_is_placed_and_equals_eager():
    torch.manual_seed(0)
    model = PlainMLAModel(Config()).eval()
    compiled = trtllm.compile(model)
    assert compiled.attention.latent and compiled.attention.head_dim == 16 + 8
    ids = random_batch(vocab_size=64, batch=2, seq_len=7)
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        want = model(ids, pos)
    torch.testing.assert_close(compiled(ids, pos), want, atol=1e-5, rtol=1e-5)
    assert count(compiled, torch.ops.trtllm.mla_attention.default) == 2
    assert count(compiled, torch.ops.trtllm.attention.default) == 0
    assert kv_b_linears(compiled) == 0  # the expansion is gone from the graph


def test_hf_deepseek_v3_attention_is_placed_with_the_key_copies_gone():
    model = make_hf_model("deepseek_v3")
    compiled = trtllm.compile(model)
    ids = random_batch(batch=2, seq_len=6)
    pos = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=pos).logits
    torch.testing.assert_close(compiled(ids, pos), want, atol=1e-5, rtol=1e-5)
    assert count(compiled, torch.ops.trtllm.mla_attention.default) == 2
    graph = compiled.graphs[0].graph
    assert not [n for n in graph.nodes if n.op == "call_method" and n.target in ("copy_", "new_empty")]
    assert kv_b_linears(compiled) == 0
    assert compiled.matches["place_mla_attention"] == 2
    assert compiled.matches["replace_sdpa_with_paged_attention"] == 0


def test_an_mla_the_pass_cannot_read_is_refused_by_name():
    model = PlainMLAModel(Config(), spelling="other").eval()
    with pytest.raises(CompileError, match=r"multi-head latent attention not spelled as place_mla_attention "
                                           r"expects \(the key's rope part"):
        trtllm.compile(model)(random_batch(vocab_size=64, batch=1, seq_len=3), torch.arange(3)[None])


def test_a_model_without_latent_attention_is_left_alone():
    compiled = trtllm.compile(make_hf_model("llama2"))
    compiled(random_batch(batch=1, seq_len=3), torch.arange(3)[None])
    assert compiled.matches["place_mla_attention"] == 0 and not compiled.attention.latent
    assert count(compiled, torch.ops.trtllm.attention.default) == 2
