"""MPT (MptForCausalLM) as HF's transformers module runs it: ALiBi, no position embedding.

One plain PyTorch module following the compilable-model contract (docs: DESIGN.md):

    forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]

`positions` is unused: ALiBi adds slope_h * (key - query position) to each head's scaled
scores, with MPT's slopes (`mpt_alibi_slopes`) in ``config.alibi_slopes``: eagerly
models/attention.py's `causal_attention` adds them, under `trtllm.compile` the paged
attention kernels (the probe reads ``config.alibi_slopes``). HF adds slope_h * (key - last
key) (build_mpt_alibi_tensor): the same under each row's softmax.

Otherwise: LayerNorms without bias, fused ``Wqkv`` (q, k, v one after the other) without
bias, optional ``clip_qkv`` clamp, ``softmax_scale``, exact-GELU MLP of 4 x hidden, LM head
tied to the embedding. Where HF's module ignores a field of MPT's attn_config that MPT's
own code honours (``qk_ln``, ``alibi`` off, ``alibi_bias_max`` other than 8) the config is
refused by name: HF's output would not be the model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trtllm.models.attention import causal_attention
from trtllm.models.llama import refuse_quantization_config

# HF architecture names this file implements (config.json "architectures"[0]).
HF_ARCHITECTURES = ("MptForCausalLM",)


def mpt_alibi_slopes(num_heads: int, alibi_bias_max: int = 8) -> list[float]:
    """ALiBi slopes as HF's MPT computes them (build_mpt_alibi_tensor, fp32): 1 / 2^(i *
    bias_max / n) for the power of two n >= heads, odd-indexed ones first when n > heads. On the CPU whatever the default device."""
    with torch.device("cpu"):  # not the loader's meta device
        n = 2 ** math.ceil(math.log2(num_heads))
        base = torch.arange(1, n + 1, dtype=torch.int64).float() * (alibi_bias_max / n)
        slopes = 1.0 / torch.pow(2, base)
        if n != num_heads:
            slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
        return slopes.tolist()


@dataclass
class MptConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_norm_epsilon: float = 1e-5
    softmax_scale: float | None = None  # None = head_dim ** -0.5
    clip_qkv: float | None = None  # clamp of the fused qkv projection, None = none
    tie_word_embeddings: bool = True
    alibi_slopes: list[float] = field(default_factory=list)  # one per head: what the paged kernels add

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        self.alibi_slopes = self.alibi_slopes or mpt_alibi_slopes(self.num_attention_heads)
        if len(self.alibi_slopes) != self.num_attention_heads:
            raise ValueError(f"alibi_slopes has {len(self.alibi_slopes)} entries, expected one per head "
                             f"({self.num_attention_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf_config: Any) -> MptConfig:
        """From a transformers MptConfig or a config.json dict."""
        d = dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()
        if d.get("model_type", "mpt") != "mpt":
            raise ValueError(f"model_type={d.get('model_type')!r} is not MPT (mpt)")
        refuse_quantization_config(d, "trtllm.models.mpt")
        attn = dict(d.get("attn_config") or {})
        # What HF's MptAttention ignores: refused rather than run as HF would (not as MPT would).
        if attn.get("qk_ln"):
            raise ValueError("attn_config.qk_ln=True is not supported: HF's MPT module ignores it")
        if attn.get("alibi") is False:
            raise ValueError("attn_config.alibi=False is not supported: HF's MPT module applies ALiBi regardless")
        if attn.get("alibi_bias_max", 8) != 8:
            raise ValueError(f"attn_config.alibi_bias_max={attn['alibi_bias_max']} is not supported: HF's MPT "
                             "module uses 8 regardless")
        if attn.get("prefix_lm") or attn.get("attn_uses_sequence_id"):
            raise ValueError("attn_config prefix_lm / attn_uses_sequence_id are not supported (causal attention only)")
        if d.get("expansion_ratio", 4) != 4:
            raise ValueError(f"expansion_ratio={d['expansion_ratio']} is not supported: HF's MPT MLP is 4 x hidden")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["d_model"],
            num_hidden_layers=d["n_layers"],
            num_attention_heads=d["n_heads"],
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            softmax_scale=attn.get("softmax_scale"),
            clip_qkv=attn.get("clip_qkv"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        )


class Attention(nn.Module):
    def __init__(self, config: MptConfig):
        super().__init__()
        h = config.hidden_size
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scale = config.softmax_scale or self.head_dim**-0.5
        self.clip_qkv = config.clip_qkv
        self.Wqkv = nn.Linear(h, 3 * h, bias=False)  # [Wq; Wk; Wv]
        self.out_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, alibi_slopes: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape  # [B, S, hidden]
        qkv = self.Wqkv(x)  # [B, S, 3 * hidden]
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = (t.reshape(B, S, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
        # Eagerly ALiBi is added here; under trtllm.compile this is plain causal SDPA and the
        # paged attention op adds it (from config.alibi_slopes).
        y = causal_attention(q, k, v, scale=self.scale, alibi_slopes=alibi_slopes)  # [B, H, S, D]
        return self.out_proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: MptConfig):
        super().__init__()
        h = config.hidden_size
        self.up_proj = nn.Linear(h, 4 * h, bias=False)
        self.down_proj = nn.Linear(4 * h, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: MptConfig):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.norm_1 = nn.LayerNorm(h, eps=eps, bias=False)
        self.attn = Attention(config)
        self.norm_2 = nn.LayerNorm(h, eps=eps, bias=False)
        self.ffn = MLP(config)

    def forward(self, x: torch.Tensor, alibi_slopes: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        h = x + self.attn(self.norm_1(x), alibi_slopes)
        return h + self.ffn(self.norm_2(h))


class MptModel(nn.Module):
    def __init__(self, config: MptConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon, bias=False)
        self.register_buffer("alibi_slopes", torch.tensor(config.alibi_slopes, dtype=torch.float32), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, hidden]
        x = self.wte(input_ids)
        for block in self.blocks:
            x = block(x, self.alibi_slopes)
        return self.norm_f(x)


class MptForCausalLM(nn.Module):
    """MPT causal LM. Module and parameter names mirror HF's (transformer.wte,
    transformer.blocks.{i}.{norm_1, attn.{Wqkv,out_proj}, norm_2, ffn.{up_proj,down_proj}},
    transformer.norm_f, lm_head), so checkpoint names map by identity."""

    config_class = MptConfig

    def __init__(self, config: MptConfig):
        super().__init__()
        self.config = config
        self.transformer = MptModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)make the ALiBi slopes buffer (fp32), e.g. after meta-device construction."""
        device = device if device is not None else self.transformer.wte.weight.device
        self.transformer.alibi_slopes = torch.tensor(self.config.alibi_slopes, dtype=torch.float32, device=device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: LongTensor [B, S] (positions unused: ALiBi) -> logits [B, S, V]."""
        return self.lm_head(self.transformer(input_ids))
