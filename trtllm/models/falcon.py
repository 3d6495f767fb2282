"""Falcon (FalconForCausalLM) as HF configs describe it: Falcon-RW (ALiBi), Falcon-7B
(multi-query, parallel attention + MLP), Falcon-40B/180B (`new_decoder_architecture`:
grouped KV heads, separate LayerNorms for attention and MLP).

One plain PyTorch module following the compilable-model contract (docs: DESIGN.md):

    forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]

Transformers 5's Falcon does not go through HF's attention interface (its own masked SDPA
or eager code), so `LLM(model=path)` runs this file. Per config:

- attention: ``query_key_value`` fused as the checkpoint stores it, split here into q, k, v:
  [H, 3, D] rows (neither flag), [H + 2, D] (``multi_query``: one kv head), or
  [Hkv, G + 2, D] (``new_decoder_architecture``: G query heads then k, v per kv group);
  rotary (`rope_parameters`, default or scaled as models/llama.py does) or, with ``alibi``,
  ALiBi: HF adds bf16(slope_h) * key position to the raw scores before scaling them by
  head_dim^-0.5, i.e. slope_h * head_dim^-0.5 on the scaled scores, which is what
  ``config.alibi_slopes`` holds for the paged kernels. HF rounds slope * position to bf16
  (build_alibi_tensor); exact for power-of-two head counts up to 256 positions, past that
  HF's bias carries that rounding and ours does not;
- block: sequential (input / post-attention LayerNorms), parallel (`parallel_attn`: one
  LayerNorm feeding attention and MLP), or the new architecture's two LayerNorms
  (`ln_attn`, `ln_mlp`; one with ``num_ln_in_parallel_attn=1``);
- MLP: GELU (exact) between ``dense_h_to_4h`` and ``dense_4h_to_h``, ``bias`` on every linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trtllm.models.attention import causal_attention
from trtllm.models.bloom import bloom_alibi_slopes
from trtllm.models.llama import RotaryEmbedding, apply_rotary_pos_emb, refuse_quantization_config, rope_from_hf

# HF architecture names this file implements (config.json "architectures"[0]).
HF_ARCHITECTURES = ("FalconForCausalLM",)


def falcon_alibi_slopes(num_heads: int, head_dim: int) -> list[float]:
    """The slopes the paged kernels add on the scaled scores: BLOOM's, rounded to bf16 as HF's
    Falcon rounds them, times head_dim^-0.5 (HF scales the raw scores and the bias together)."""
    with torch.device("cpu"):  # not the loader's meta device
        slopes = torch.tensor(bloom_alibi_slopes(num_heads), dtype=torch.float32)
        return (slopes.bfloat16().float() / math.sqrt(head_dim)).tolist()


@dataclass
class FalconConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # 1 with multi_query; the groups of new_decoder_architecture
    ffn_hidden_size: int
    layer_norm_epsilon: float = 1e-5
    bias: bool = False
    layout: str = "sequential"  # "sequential", "parallel" (one LayerNorm), "parallel2" (ln_attn, ln_mlp)
    qkv_layout: str = "mha"  # "mha" ([H, 3, D]), "mqa" ([H + 2, D]), "grouped" ([Hkv, G + 2, D])
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True
    alibi_slopes: list[float] = field(default_factory=list)  # per head, on scaled scores; [] = rotary

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"hidden_size={self.hidden_size}, heads={self.num_attention_heads}, "
                             f"kv heads={self.num_key_value_heads}: not divisible")
        if self.alibi_slopes and len(self.alibi_slopes) != self.num_attention_heads:
            raise ValueError(f"alibi_slopes has {len(self.alibi_slopes)} entries, expected one per head")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf_config: Any) -> FalconConfig:
        """From a transformers FalconConfig or a config.json dict (transformers 4 or 5 layout)."""
        d = dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()
        if d.get("model_type", "falcon") != "falcon":
            raise ValueError(f"model_type={d.get('model_type')!r} is not Falcon (falcon)")
        if isinstance(hf_config, dict):  # as HF's FalconConfig holds it: defaults and legacy names filled
            from transformers import FalconConfig as HFFalconConfig  # imported here: transformers is slow to load

            d = HFFalconConfig(**d).to_dict()
        refuse_quantization_config(d, "trtllm.models.falcon")
        if d.get("activation", "gelu") != "gelu":
            raise ValueError(f"activation={d['activation']!r} is not supported (only 'gelu')")
        heads, hidden = d["num_attention_heads"], d["hidden_size"]
        new_arch, parallel = bool(d.get("new_decoder_architecture")), bool(d.get("parallel_attn", True))
        if new_arch:
            n_ln = d.get("num_ln_in_parallel_attn") or 2
            if n_ln == 1 and not parallel:
                raise ValueError("new_decoder_architecture with num_ln_in_parallel_attn=1 and parallel_attn=False "
                                 "has no MLP LayerNorm in HF's FalconDecoderLayer")
            layout, qkv, kv = ("parallel2" if n_ln == 2 else "parallel"), "grouped", d.get("num_kv_heads") or heads
        elif d.get("multi_query", True):
            layout, qkv, kv = ("parallel" if parallel else "sequential"), "mqa", 1
        else:
            layout, qkv, kv = ("parallel" if parallel else "sequential"), "mha", heads
            if (d.get("num_kv_heads") or heads) != heads:
                raise ValueError(f"num_kv_heads={d['num_kv_heads']} without multi_query or new_decoder_architecture: "
                                 "HF's Falcon reads [H, 3, D] rows, one kv head per query head")
        theta, scaling = rope_from_hf(d)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv,
            ffn_hidden_size=d.get("ffn_hidden_size") or 4 * hidden,
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            bias=bool(d.get("bias", False)),
            layout=layout,
            qkv_layout=qkv,
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            alibi_slopes=falcon_alibi_slopes(heads, hidden // heads) if d.get("alibi") else [],
        )


class Attention(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.qkv_layout = config.qkv_layout
        self.query_key_value = nn.Linear(h, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=config.bias)
        self.dense = nn.Linear(h, h, bias=config.bias)

    def split_heads(self, qkv: torch.Tensor):  # [B, S, (H + 2 KVH) * D] -> q [B, H, S, D], k/v [B, KVH, S, D]
        B, S, _ = qkv.shape
        H, KVH, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv_layout == "mha":
            qkv = qkv.view(B, S, H, 3, D)
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # [B, S, H, D]
        elif self.qkv_layout == "mqa":
            qkv = qkv.view(B, S, H + 2, D)
            q, k, v = qkv[:, :, :H], qkv[:, :, H:H + 1], qkv[:, :, H + 1:]  # [B, S, H | 1, D]
        else:  # grouped: per kv group its G query heads, then k, then v
            qkv = qkv.view(B, S, KVH, H // KVH + 2, D)
            q, k, v = qkv[..., :-2, :].flatten(2, 3), qkv[..., -2, :], qkv[..., -1, :]  # [B, S, H | KVH, D]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, cos, sin, alibi_slopes: torch.Tensor | None) -> torch.Tensor:
        B, S, _ = x.shape  # [B, S, hidden]
        q, k, v = self.split_heads(self.query_key_value(x))
        if alibi_slopes is None:
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        # Eagerly ALiBi is added here; under trtllm.compile this is plain causal SDPA and the
        # paged attention op adds it (from config.alibi_slopes).
        y = causal_attention(q, k, v, scale=self.head_dim**-0.5, alibi_slopes=alibi_slopes)  # [B, H, S, D]
        return self.dense(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=config.bias)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.layout = config.layout
        self.self_attention = Attention(config)
        self.mlp = MLP(config)
        if self.layout == "parallel2":
            self.ln_attn = nn.LayerNorm(h, eps=eps)
            self.ln_mlp = nn.LayerNorm(h, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(h, eps=eps)
        if self.layout == "sequential":
            self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, cos, sin, alibi_slopes) -> torch.Tensor:  # [B, S, hidden]
        if self.layout == "parallel2":
            return self.mlp(self.ln_mlp(x)) + self.self_attention(self.ln_attn(x), cos, sin, alibi_slopes) + x
        ln = self.input_layernorm(x)
        attn = self.self_attention(ln, cos, sin, alibi_slopes)
        if self.layout == "parallel":
            return self.mlp(ln) + attn + x
        h = attn + x
        return self.mlp(self.post_attention_layernorm(h)) + h


class FalconModel(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.alibi = bool(config.alibi_slopes)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("alibi_slopes", torch.tensor(config.alibi_slopes, dtype=torch.float32), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, hidden]
        x = self.word_embeddings(input_ids)  # [B, S, hidden]
        cos, sin = (None, None) if self.alibi else self.rotary_emb(positions, x.dtype)  # [B, S, D]
        slopes = self.alibi_slopes if self.alibi else None
        for layer in self.h:
            x = layer(x, cos, sin, slopes)
        return self.ln_f(x)


class FalconForCausalLM(nn.Module):
    """Falcon causal LM. Module and parameter names mirror HF's (transformer.word_embeddings,
    transformer.h.{i}.{self_attention.{query_key_value,dense}, mlp.{dense_h_to_4h,dense_4h_to_h},
    input_layernorm | ln_attn + ln_mlp, post_attention_layernorm}, transformer.ln_f, lm_head),
    so checkpoint names map by identity."""

    config_class = FalconConfig

    def __init__(self, config: FalconConfig):
        super().__init__()
        self.config = config
        self.transformer = FalconModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute non-persistent buffers (rope inv_freq, ALiBi slopes; fp32)."""
        device = device if device is not None else self.transformer.word_embeddings.weight.device
        self.transformer.rotary_emb.init_buffers(device)
        self.transformer.alibi_slopes = torch.tensor(self.config.alibi_slopes, dtype=torch.float32, device=device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: LongTensor [B, S] (positions unused with ALiBi) -> logits [B, S, V]."""
        return self.lm_head(self.transformer(input_ids, positions))
