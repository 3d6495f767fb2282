"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention, a sparse mixture of experts
beside a shared expert behind a sigmoid gate.

One plain PyTorch module following the compilable-model contract (models/llama.py's attention,
norms, rope and dense MLP; models/qwen3_moe.py's router, experts and their layout):

    forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]

    y = moe(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)          # per token, [T, H]

where moe is qwen3_moe's block (softmax top-k, renormalised only with norm_topk_prob: Qwen1.5's
checkpoints leave it off) and shared_expert a dense SwiGLU MLP of
`shared_expert_intermediate_size`. passes/fuse_moe.py replaces the routed part; the shared
expert stays ordinary graph ops (its gate and up fused by fuse_parallel_linears, SiLU·mul fused).
Layers in `mlp_only_layers` (or off `decoder_sparse_step`) have the dense MLP of `intermediate_size`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trtllm.models import qwen3_moe
from trtllm.models.llama import MLP, LlamaConfig
from trtllm.models.qwen3_moe import EXPERT_TENSORS, Qwen3MoeForCausalLM, SparseMoeBlock

HF_ARCHITECTURES = ("Qwen2MoeForCausalLM",)


@dataclass
class Qwen2MoeConfig(LlamaConfig):
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None

    def is_moe_layer(self, i: int) -> bool:
        """As transformers' Qwen2MoeDecoderLayer decides it."""
        return (i not in (self.mlp_only_layers or []) and self.num_experts > 0
                and (i + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_hf(cls, hf_config: Any) -> Qwen2MoeConfig:
        d = dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()
        if d.get("model_type", "qwen2_moe") != "qwen2_moe":
            raise ValueError(f"model_type={d.get('model_type')!r} is not qwen2_moe")
        base = LlamaConfig.from_hf({**d, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
        base.qkv_bias = bool(d.get("qkv_bias", True))  # Qwen2 always has them; Qwen2-MoE says so in its config
        return cls(**asdict(base), moe_intermediate_size=d["moe_intermediate_size"],
                   shared_expert_intermediate_size=d["shared_expert_intermediate_size"],
                   num_experts=d["num_experts"] if "num_experts" in d else d["num_local_experts"],
                   num_experts_per_tok=d["num_experts_per_tok"], norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                   decoder_sparse_step=d.get("decoder_sparse_step", 1) or 1,
                   mlp_only_layers=list(d.get("mlp_only_layers") or []))


class SharedExpertMoeBlock(SparseMoeBlock):
    def __init__(self, config: Qwen2MoeConfig):
        super().__init__(config)
        self.shared_expert = MLP(replace(config, intermediate_size=config.shared_expert_intermediate_size))
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, H]
        return super().forward(x) + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class DecoderLayer(qwen3_moe.DecoderLayer):
    moe_block = SharedExpertMoeBlock


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    """Module and parameter names mirror the checkpoints' (model.layers.{i}.mlp.gate, .mlp.shared_expert.*,
    .mlp.shared_expert_gate, the rest as models/llama.py); the per-expert tensors are stacked by the loader."""

    config_class = Qwen2MoeConfig
    expert_tensors = EXPERT_TENSORS
    decoder_layer = DecoderLayer
