"""OLMoE (OLMoE-1B-7B): Llama's layout with QK-norm over the whole q / k projections and a sparse
mixture of experts in every layer.

One plain PyTorch module following the compilable-model contract (models/llama.py's norms, rope
and SDPA call; models/qwen3_moe.py's MoE block and expert layout):

    forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]

Its attention differs from llama.py's in one place: q_norm and k_norm are RMSNorms over the
whole projection (H * D and KVH * D wide), before the split into heads, not over each head
(Qwen3). With `clip_qkv` set, q, k and v are clamped to [-clip_qkv, clip_qkv] after it, as in
transformers. Routing: softmax top-k over E experts, renormalised only with norm_topk_prob
(off in OLMoE-1B-7B).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from trtllm.models import qwen3_moe
from trtllm.models.attention import causal_attention
from trtllm.models.llama import Attention, LlamaConfig, RMSNorm, apply_rotary_pos_emb
from trtllm.models.qwen3_moe import EXPERT_TENSORS, Qwen3MoeForCausalLM

HF_ARCHITECTURES = ("OlmoeForCausalLM",)


@dataclass
class OlmoeConfig(LlamaConfig):
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0   # = intermediate_size: every layer's MLP is the experts
    norm_topk_prob: bool = False
    clip_qkv: float | None = None

    def is_moe_layer(self, i: int) -> bool:
        return True

    @classmethod
    def from_hf(cls, hf_config: Any) -> OlmoeConfig:
        d = dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()
        if d.get("model_type", "olmoe") != "olmoe":
            raise ValueError(f"model_type={d.get('model_type')!r} is not olmoe")
        base = LlamaConfig.from_hf({**d, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
        return cls(**asdict(base), num_experts=d["num_experts"] if "num_experts" in d else d["num_local_experts"],
                   num_experts_per_tok=d["num_experts_per_tok"], moe_intermediate_size=d["intermediate_size"],
                   norm_topk_prob=bool(d.get("norm_topk_prob", False)), clip_qkv=d.get("clip_qkv"))


class OlmoeAttention(Attention):
    def __init__(self, config: OlmoeConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.q_norm = RMSNorm(self.n_heads * self.head_dim, config.rms_norm_eps)  # over the whole projection
        self.k_norm = RMSNorm(self.n_kv_heads * self.head_dim, config.rms_norm_eps)
        self.clip = config.clip_qkv

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape  # [B, S, hidden]
        q, k, v = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x)), self.v_proj(x)  # [B, S, (KV)H*D]
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, S, D]
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        y = causal_attention(q, k, v, scale=self.scale)  # [B, H, S, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class DecoderLayer(qwen3_moe.DecoderLayer):  # every layer's MLP is the experts
    attention = OlmoeAttention


class OlmoeForCausalLM(Qwen3MoeForCausalLM):
    """Module and parameter names mirror the checkpoints' (q_norm / k_norm over the projections,
    model.layers.{i}.mlp.gate, the rest as models/llama.py); per-expert tensors stacked by the loader."""

    config_class = OlmoeConfig
    expert_tensors = EXPERT_TENSORS
    decoder_layer = DecoderLayer
