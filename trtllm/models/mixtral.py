"""Mixtral (8x7B, 8x22B): Mistral's attention with a sparse mixture of experts in every layer.

One plain PyTorch module following the compilable-model contract (models/llama.py's attention,
norms and rope; models/qwen3_moe.py's MoE block, whose docstring tells the experts' layout and
forward):

    forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]

Mixtral's routing: softmax over the E experts' logits, top-k (2), renormalised to sum to 1.
Its experts are `intermediate_size` wide. Checkpoint names: `model.layers.{i}.block_sparse_moe.gate`
(the router) and `.block_sparse_moe.experts.{e}.w1 / w3 / w2` (gate, up, down), stacked by the
loader into `block_sparse_moe.experts.gate_up_proj` [E, 2I, H] and `.down_proj` [E, H, I]
(`EXPERT_TENSORS`). A sliding window, when the config sets one, applies to every layer (Mistral's
rule, LlamaConfig's `layer_windows`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from trtllm.models.llama import Attention, LlamaConfig, RMSNorm
from trtllm.models.qwen3_moe import Qwen3MoeForCausalLM, SparseMoeBlock

HF_ARCHITECTURES = ("MixtralForCausalLM",)
EXPERT_TENSORS = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", 0)}


@dataclass
class MixtralConfig(LlamaConfig):
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0   # = intermediate_size: every layer's MLP is the experts
    norm_topk_prob: bool = True      # Mixtral always renormalises its top-k

    @classmethod
    def from_hf(cls, hf_config: Any) -> MixtralConfig:
        d = dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()
        if d.get("model_type", "mixtral") != "mixtral":
            raise ValueError(f"model_type={d.get('model_type')!r} is not mixtral")
        base = LlamaConfig.from_hf({**d, "model_type": "mistral", "architectures": ["MistralForCausalLM"]})
        return cls(**asdict(base), num_experts=d["num_local_experts"] if "num_local_experts" in d else d["num_experts"],
                   num_experts_per_tok=d.get("num_experts_per_tok", 2), moe_intermediate_size=d["intermediate_size"])


class DecoderLayer(nn.Module):
    def __init__(self, config: MixtralConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.block_sparse_moe = SparseMoeBlock(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


class MixtralForCausalLM(Qwen3MoeForCausalLM):
    """Module and parameter names mirror the checkpoints' (model.layers.{i}.block_sparse_moe.gate,
    the rest as models/llama.py); the per-expert tensors are stacked by the loader."""

    config_class = MixtralConfig
    expert_tensors = EXPERT_TENSORS
    decoder_layer = DecoderLayer
