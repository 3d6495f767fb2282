"""BLOOM (BloomForCausalLM) as HF configs describe it: ALiBi instead of rotary positions.

One plain PyTorch module following the compilable-model contract (docs: DESIGN.md):

    forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]

`positions` is unused: BLOOM has no position embedding; ALiBi adds slope_h * (key - query
position) to each head's scaled scores, with HF's slopes (`bloom_alibi_slopes`, one per
head) in ``config.alibi_slopes``. Eagerly models/attention.py's `causal_attention` adds the
bias; under `trtllm.compile` the layer's graph holds plain causal SDPA and the paged
attention kernels add it (the probe reads ``config.alibi_slopes``). HF adds slope_h * key
position (build_alibi_tensor): the same under each row's softmax.

Otherwise a GPT-style pre-LayerNorm block with biases: the embedding LayerNorm
(``word_embeddings_layernorm``), fused ``query_key_value`` with q, k, v interleaved per head
([H, 3, D] rows, as HF reads them), BLOOM's GELU-tanh (its own constants), the
``apply_residual_connection_post_layernorm`` variant, LM head tied to the embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trtllm.models.attention import causal_attention
from trtllm.models.llama import refuse_quantization_config

# HF architecture names this file implements (config.json "architectures"[0]).
HF_ARCHITECTURES = ("BloomForCausalLM",)


def bloom_alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes as HF's BLOOM computes them (build_alibi_tensor, fp32): 2^(-8 i / n) for
    the closest power of two n <= heads, then every other slope of 2n for the rest. On the
    CPU whatever the default device (configs are made under the loader's meta device)."""
    with torch.device("cpu"):  # not the loader's meta device
        closest = 2 ** math.floor(math.log2(num_heads))
        base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
        slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
        if closest != num_heads:
            extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
            extra = min(closest, num_heads - closest)
            slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * extra, 2, dtype=torch.int32))])
        return slopes.tolist()


@dataclass
class BloomConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    tie_word_embeddings: bool = True
    alibi_slopes: list[float] = field(default_factory=list)  # one per head: what the paged kernels add

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        self.alibi_slopes = self.alibi_slopes or bloom_alibi_slopes(self.num_attention_heads)
        if len(self.alibi_slopes) != self.num_attention_heads:
            raise ValueError(f"alibi_slopes has {len(self.alibi_slopes)} entries, expected one per head "
                             f"({self.num_attention_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf_config: Any) -> BloomConfig:
        """From a transformers BloomConfig or a config.json dict."""
        d = dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()
        if d.get("model_type", "bloom") != "bloom":
            raise ValueError(f"model_type={d.get('model_type')!r} is not BLOOM (bloom)")
        refuse_quantization_config(d, "trtllm.models.bloom")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d.get("hidden_size") or d["n_embed"],
            num_hidden_layers=d.get("n_layer") or d["num_hidden_layers"],
            num_attention_heads=d.get("n_head") or d["num_attention_heads"],
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            apply_residual_connection_post_layernorm=bool(d.get("apply_residual_connection_post_layernorm", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        )


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """HF's bloom_gelu_forward: the tanh GELU with BLOOM's rounded constants."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class Attention(nn.Module):
    def __init__(self, config: BloomConfig):
        super().__init__()
        h = config.hidden_size
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.query_key_value = nn.Linear(h, 3 * h)  # rows [H, 3, D]: q, k, v interleaved per head
        self.dense = nn.Linear(h, h)

    def forward(self, x: torch.Tensor, alibi_slopes: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape  # [B, S, hidden]
        qkv = self.query_key_value(x).view(B, S, self.n_heads, 3, self.head_dim)
        q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))  # [B, H, S, D] each
        # Eagerly ALiBi is added here; under trtllm.compile this is plain causal SDPA and the
        # paged attention op adds it (from config.alibi_slopes).
        y = causal_attention(q, k, v, scale=self.head_dim**-0.5, alibi_slopes=alibi_slopes)  # [B, H, S, D]
        return self.dense(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: BloomConfig):
        super().__init__()
        h = config.hidden_size
        self.dense_h_to_4h = nn.Linear(h, 4 * h)
        self.dense_4h_to_h = nn.Linear(4 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        return self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, config: BloomConfig):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.self_attention = Attention(config)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = MLP(config)
        self.post_ln_residual = config.apply_residual_connection_post_layernorm

    def forward(self, x: torch.Tensor, alibi_slopes: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        ln = self.input_layernorm(x)
        h = self.self_attention(ln, alibi_slopes) + (ln if self.post_ln_residual else x)
        ln = self.post_attention_layernorm(h)
        return self.mlp(ln) + (ln if self.post_ln_residual else h)


class BloomModel(nn.Module):
    def __init__(self, config: BloomConfig):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.word_embeddings_layernorm = nn.LayerNorm(h, eps=eps)
        self.h = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(h, eps=eps)
        self.slopes = config.alibi_slopes
        self.register_buffer("alibi_slopes", torch.tensor(self.slopes, dtype=torch.float32), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, hidden]
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        for block in self.h:
            x = block(x, self.alibi_slopes)
        return self.ln_f(x)


class BloomForCausalLM(nn.Module):
    """BLOOM causal LM. Module and parameter names mirror HF's (transformer.word_embeddings,
    transformer.word_embeddings_layernorm, transformer.h.{i}.{input_layernorm,
    self_attention.{query_key_value,dense}, post_attention_layernorm, mlp.{dense_h_to_4h,
    dense_4h_to_h}}, transformer.ln_f, lm_head), so checkpoint names map by identity."""

    config_class = BloomConfig

    def __init__(self, config: BloomConfig):
        super().__init__()
        self.config = config
        self.transformer = BloomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)make the ALiBi slopes buffer (fp32), e.g. after meta-device construction."""
        device = device if device is not None else self.transformer.word_embeddings.weight.device
        self.transformer.alibi_slopes = torch.tensor(self.config.alibi_slopes, dtype=torch.float32, device=device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: LongTensor [B, S] (positions unused: ALiBi) -> logits [B, S, V]."""
        return self.lm_head(self.transformer(input_ids))
