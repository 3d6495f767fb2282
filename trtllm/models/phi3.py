"""Phi-3 (Phi3ForCausalLM) as HF configs describe it: Phi-3 / Phi-3.5 mini and medium, Phi-4-mini
with default rope.

One plain PyTorch module following the compilable-model contract (docs: DESIGN.md):

    forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]

A Llama with its projections already fused in the checkpoint: ``qkv_proj`` holds
[Wq; Wk; Wv] and ``gate_up_proj`` [W_gate; W_up]. They stay fused here (one GEMM each,
split by slicing its output), so parameter names equal the checkpoint's and nothing is
copied at load; ``fuse_parallel_linears`` then has nothing left to do. Besides:

- a sliding window on every layer when ``sliding_window`` is set (``layer_windows``);
- partial rotary (``partial_rotary_factor``): rope on the first ``rotary_dim`` channels of
  each head, the rest passed through;
- rope ``default`` only: ``longrope`` (and its aliases ``su``/``yarn``) is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trtllm.models.attention import causal_attention
from trtllm.models.llama import RMSNorm, RotaryEmbedding, refuse_quantization_config, rope_from_hf, rotate_half

# HF architecture names this file implements (config.json "architectures"[0]).
HF_ARCHITECTURES = ("Phi3ForCausalLM",)


@dataclass
class Phi3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int  # head_dim * partial_rotary_factor: the rotated channels of each head
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    layer_windows: list[int] = field(default_factory=list)  # per layer; 0 = full attention

    def __post_init__(self):
        if not self.layer_windows:
            self.layer_windows = [0] * self.num_hidden_layers
        if len(self.layer_windows) != self.num_hidden_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries, "
                             f"expected num_hidden_layers={self.num_hidden_layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")

    @classmethod
    def from_hf(cls, hf_config: Any) -> Phi3Config:
        """From a transformers PretrainedConfig or a config.json dict (transformers 4 or 5 layout)."""
        d = dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()
        if d.get("model_type", "phi3") != "phi3":
            raise ValueError(f"model_type={d.get('model_type')!r} is not Phi-3 (phi3)")
        if isinstance(hf_config, dict):  # as HF's Phi3Config holds it: legacy rope fields converted
            from transformers import Phi3Config as HFPhi3Config  # imported here: transformers is slow to load

            d = HFPhi3Config(**d).to_dict()
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={act!r} is not supported (only 'silu')")
        refuse_quantization_config(d, "trtllm.models.phi3")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        rope = dict(d.get("rope_parameters") or {})
        partial = rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        theta, scaling = rope_from_hf({"rope_parameters": rope})  # refuses longrope by name
        if scaling is not None:  # HF's Phi3Config admits only default and longrope
            raise ValueError(f"rope_type={scaling['rope_type']!r} is not supported for Phi-3 (only 'default')")
        n_layers, window = d["num_hidden_layers"], d.get("sliding_window") or 0
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rotary_dim=int(head_dim * partial),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=theta,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            layer_windows=[int(window)] * n_layers,  # HF's Phi3Attention: the same window on every layer
        )


def apply_partial_rotary(q, k, cos, sin):  # q [B, H, S, D], k [B, KVH, S, D], cos/sin [B, S, R], R <= D
    """Rope on the first R channels of each head, as HF's Phi-3 (R = D: plain rope)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, R]
    R = cos.shape[-1]
    q_rot, q_pass = q[..., :R], q[..., R:]
    k_rot, k_pass = k[..., :R], k[..., R:]
    q_embed = torch.cat([q_rot * cos + rotate_half(q_rot) * sin, q_pass], dim=-1)
    k_embed = torch.cat([k_rot * cos + rotate_half(k_rot) * sin, k_pass], dim=-1)
    return q_embed, k_embed


class Attention(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.scale = hd**-0.5
        self.window = config.layer_windows[layer_idx]  # 0 = full causal attention
        self.qkv_proj = nn.Linear(d, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=False)  # [Wq; Wk; Wv]
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape  # [B, S, hidden]
        qkv = self.qkv_proj(x)  # [B, S, (H + 2 KVH) * D]
        nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q = qkv[..., :nq].view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = qkv[..., nq: nq + nkv].view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, S, D]
        v = qkv[..., nq + nkv:].view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, S, D]
        q, k = apply_partial_rotary(q, k, cos, sin)
        # Eagerly the window is applied here (a banded mask); under trtllm.compile this is plain
        # causal SDPA and the paged attention op applies it (from config.layer_windows).
        y = causal_attention(q, k, v, scale=self.scale, window=self.window)  # [B, H, S, D]
        y = y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)  # [B, S, H*D]
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        d, ff = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Linear(d, 2 * ff, bias=False)  # [W_gate; W_up]
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [B, S, ff] each
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Phi3Model(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta, None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, hidden]
        x = self.embed_tokens(input_ids)  # [B, S, hidden]
        cos, sin = self.rotary_emb(positions, x.dtype)  # [B, S, R]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class Phi3ForCausalLM(nn.Module):
    """Phi-3 causal LM.

    Module and parameter names mirror HF's exactly (model.embed_tokens,
    model.layers.{i}.self_attn.{qkv,o}_proj, .mlp.{gate_up,down}_proj, .input_layernorm,
    .post_attention_layernorm, model.norm, lm_head), so the mapping from checkpoint tensor
    names to parameter names is the identity.
    """

    config_class = Phi3Config

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """lm_head shares embed_tokens' Parameter when the config ties them (call again after replacing it)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute non-persistent buffers (rope inv_freq, fp32), e.g. after meta-device construction."""
        device = device if device is not None else self.model.embed_tokens.weight.device
        self.model.rotary_emb.init_buffers(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: LongTensor [B, S] -> logits [B, S, V]."""
        return self.lm_head(self.model(input_ids, positions))
