"""A zoo of small plain-PyTorch causal LMs written to the contract, as researchers write
them: no HF, no config class of ours, each with features the Llama file does not have.

    ZOO: name -> constructor(vocab_size) -> nn.Module (random weights, eval mode)
    greedy_reference(model, prompt, new) -> the model's own eager greedy tokens

Each `forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]` with causal
`F.scaled_dot_product_attention`; `trtllm.compile` must give the same logits and
`LLM(model)` the same greedy tokens (tests/runtime/test_zoo.py, and on the GPU with CUDA
graphs in tests/runtime/test_zoo_gpu.py).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotary on the first `rotary_dim` of head_dim (partial rotary), half-split layout.
    x [B, H, S, D], positions [B, S]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=x.device).float() / rotary_dim)  # [R/2]
    freqs = positions[:, None, :, None].float() * inv_freq  # [B, 1, S, R/2]
    cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, rest), dim=-1)


class ParallelBlockLM(nn.Module):
    """GPT-J/PaLM-style: one LayerNorm feeds attention and MLP in parallel; QK LayerNorm over
    head_dim, partial rotary (half of head_dim), GELU-tanh gated MLP, untied head."""

    def __init__(self, vocab_size: int, dim: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(self._block(dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def _block(self, dim: int) -> nn.ModuleDict:
        hd = self.head_dim
        return nn.ModuleDict(dict(
            norm=nn.LayerNorm(dim), q=nn.Linear(dim, self.heads * hd), k=nn.Linear(dim, self.kv_heads * hd),
            v=nn.Linear(dim, self.kv_heads * hd), o=nn.Linear(self.heads * hd, dim, bias=False),
            q_norm=nn.LayerNorm(hd), k_norm=nn.LayerNorm(hd),
            gate=nn.Linear(dim, 2 * dim, bias=False), up=nn.Linear(dim, 2 * dim, bias=False),
            down=nn.Linear(2 * dim, dim, bias=False)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)  # [B, S, D]
        B, S, _ = x.shape
        for blk in self.blocks:
            h = blk["norm"](x)
            q = blk["q_norm"](blk["q"](h).view(B, S, self.heads, self.head_dim)).transpose(1, 2)  # [B, H, S, hd]
            k = blk["k_norm"](blk["k"](h).view(B, S, self.kv_heads, self.head_dim)).transpose(1, 2)
            v = blk["v"](h).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, S, hd]
            q, k = rope(q, positions, self.head_dim // 2), rope(k, positions, self.head_dim // 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [B, H, S, hd]
            a = blk["o"](a.transpose(1, 2).reshape(B, S, -1))
            m = blk["down"](F.gelu(blk["gate"](h), approximate="tanh") * blk["up"](h))
            x = x + a + m
        return self.head(self.norm(x))  # [B, S, V]


class PostNormLearnedPositionsLM(nn.Module):
    """BERT/GPT-1-style post-norm blocks, learned absolute positions, multi-query attention
    with heads repeated by `repeat_interleave`, GELU MLP with biases, tied head."""

    def __init__(self, vocab_size: int, dim: int = 48, heads: int = 3, layers: int = 2, max_positions: int = 256):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_positions, dim)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            q=nn.Linear(dim, dim), kv=nn.Linear(dim, 2 * self.head_dim), o=nn.Linear(dim, dim),
            ln1=nn.LayerNorm(dim), fc1=nn.Linear(dim, 4 * dim), fc2=nn.Linear(4 * dim, dim), ln2=nn.LayerNorm(dim)))
            for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.tok(input_ids) + self.pos(positions)  # [B, S, D]
        B, S, D = x.shape
        for lyr in self.layers:
            q = lyr["q"](x).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # [B, H, S, hd]
            k, v = lyr["kv"](x).view(B, S, 1, 2 * self.head_dim).transpose(1, 2).chunk(2, dim=-1)  # [B, 1, S, hd]
            k, v = k.repeat_interleave(self.heads, dim=1), v.repeat_interleave(self.heads, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = lyr["ln1"](x + lyr["o"](a.transpose(1, 2).reshape(B, S, D)))
            x = lyr["ln2"](x + lyr["fc2"](F.gelu(lyr["fc1"](x))))
        return x @ self.tok.weight.t()  # [B, S, V]


class WindowedRMSNormLM(nn.Module):
    """Llama-like with a hand-written RMSNorm (scale folded differently), a custom softmax
    scale, one sliding-window layer (declared as `config.layer_windows`, the window applied
    by a banded mask in eager only, as trtllm/models/llama.py does) and logit scaling."""

    def __init__(self, vocab_size: int, dim: int = 64, heads: int = 4, layers: int = 2, window: int = 5):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.config = SimpleNamespace(layer_windows=[0, window] + [0] * (layers - 2))
        self.embed = nn.Embedding(vocab_size, dim)
        self.attn = nn.ModuleList(nn.Linear(dim, 3 * dim, bias=False) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 3 * dim), nn.SiLU(), nn.Linear(3 * dim, dim))
                                 for _ in range(layers))
        self.gains = nn.Parameter(1 + 0.1 * torch.randn(2 * layers + 1, dim))
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def rms(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * self.gains[i]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)  # [B, S, D]
        B, S, D = x.shape
        for i, window in enumerate(self.config.layer_windows):
            q, k, v = self.attn[i](self.rms(x, 2 * i)).view(B, S, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k = rope(q, positions, self.head_dim), rope(k, positions, self.head_dim)
            scale = 1.0 / math.sqrt(2 * self.head_dim)
            if window and S > window and not torch.compiler.is_compiling():
                idx = torch.arange(S, device=x.device)
                band = (idx[:, None] - idx[None, :] >= 0) & (idx[:, None] - idx[None, :] < window)  # [S, S]
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=scale)
            else:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            x = x + self.proj[i](a.transpose(1, 2).reshape(B, S, D))
            x = x + self.mlp[i](self.rms(x, 2 * i + 1))
        return 0.5 * self.head(self.rms(x, -1))  # [B, S, V]


class MoELM(nn.Module):
    """Pre-norm blocks whose MLP is a mixture of experts written the obvious way: a router
    linear, softmax, top-2 of 4, renormalised, a loop over the experts (SwiGLU) with
    index_add_. passes/fuse_moe.py turns each into moe_routing + fused_moe."""

    def __init__(self, vocab_size: int, dim: int = 64, heads: int = 4, layers: int = 2, experts: int = 4,
                 inter: int = 32, top_k: int = 2):
        super().__init__()
        self.heads, self.head_dim, self.top_k = heads, dim // heads, top_k
        self.embed = nn.Embedding(vocab_size, dim)
        self.norms = nn.ModuleList(nn.RMSNorm(dim, eps=1e-6) for _ in range(2 * layers + 1))
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim, bias=False) for _ in range(layers))
        self.o = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))
        self.router = nn.ModuleList(nn.Linear(dim, experts, bias=False) for _ in range(layers))
        self.experts = nn.ModuleList(nn.ModuleList(nn.ModuleDict(dict(
            gate=nn.Linear(dim, inter, bias=False), up=nn.Linear(dim, inter, bias=False),
            down=nn.Linear(inter, dim, bias=False))) for _ in range(experts)) for _ in range(layers))
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def moe(self, i: int, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        w, ids = torch.topk(F.softmax(self.router[i](x), dim=-1), self.top_k, dim=-1)  # [T, k]
        w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts[i]):
            tok, j = torch.where(ids == e)
            h = expert["down"](F.silu(expert["gate"](x[tok])) * expert["up"](x[tok]))
            out.index_add_(0, tok, h * w[tok, j, None])
        return out.view(shape)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)  # [B, S, D]
        B, S, D = x.shape
        for i in range(len(self.qkv)):
            q, k, v = self.qkv[i](self.norms[2 * i](x)).view(B, S, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k = rope(q, positions, self.head_dim), rope(k, positions, self.head_dim)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, hd]
            x = x + self.o[i](a.transpose(1, 2).reshape(B, S, D))
            x = x + self.moe(i, self.norms[2 * i + 1](x))
        return self.head(self.norms[-1](x))  # [B, S, V]


ZOO = {
    "parallel_block": ParallelBlockLM,
    "post_norm_learned_positions": PostNormLearnedPositionsLM,
    "windowed_rms_norm": WindowedRMSNormLM,
    "moe": MoELM,
}


def make(name: str, vocab_size: int = 128, dtype=torch.float32, device="cpu") -> nn.Module:
    """A zoo model with random weights (biases and norm weights random too, so a misplaced
    tensor shows)."""
    model = ZOO[name](vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(p + 0.1 * torch.randn_like(p))
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def greedy_reference(model: nn.Module, prompt: list[int], new: int) -> list[int]:
    """The model's own eager greedy continuation: a full forward per token, no cache."""
    device = next(model.parameters()).device
    ids = list(prompt)
    for _ in range(new):
        t = torch.tensor([ids], device=device)
        logits = model(t, torch.arange(len(ids), device=device)[None])
        ids.append(int(logits[0, -1].float().argmax()))
    return ids[len(prompt):]
