"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention with a sparse mixture of experts.

One plain PyTorch module following the compilable-model contract, as models/llama.py (whose
attention, norms, rope and dense MLP it reuses):

    forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]

Each layer's MLP is a `SparseMoeBlock` (every layer but `mlp_only_layers`, and with
`decoder_sparse_step` s every s-th one), else llama.py's dense MLP of `intermediate_size`:

    logits = gate(x)                                          # [T, E] router
    w, ids = topk(softmax(logits.float()), k)                 # [T, k]; renormalised if norm_topk_prob
    y[t] = sum_j w[t, j] * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t])),   e = ids[t, j]

The experts are two 3-D parameters, named and laid out as transformers 5 holds them:
`experts.gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `experts.down_proj` [E, H, I].
passes/fuse_moe.py replaces each block by `trtllm.moe_routing` + `trtllm.fused_moe` (checked
on random ids first), QuantConfig FP8 quantizes the two as FP8 experts, and expert parallelism
splits them. Checkpoints hold one tensor per expert and projection
(`mlp.experts.{e}.{gate,up,down}_proj.weight`); the loader stacks them (`EXPERT_TENSORS`).

The experts' forward has two forms of one computation: traced (and for few tokens) each
slot's expert weights gathered and contracted (gpt-fast's MoE: few nodes, what fuse_moe
replaces); eagerly over more than EAGER_GATHER_SLOTS slots a loop over the experts (the gathered
form would hold T * k copies of an expert's weights).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trtllm.models.llama import MLP, Attention, LlamaConfig, RMSNorm, RotaryEmbedding

HF_ARCHITECTURES = ("Qwen3MoeForCausalLM",)
EAGER_GATHER_SLOTS = 64  # eager calls with more (token, expert) slots loop over the experts instead
# checkpoint tensor of expert e -> (the 3-D parameter under `.experts.`, which rows): loader.py stacks them
EXPERT_TENSORS = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}


@dataclass
class Qwen3MoeConfig(LlamaConfig):
    moe_intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    def is_moe_layer(self, i: int) -> bool:
        """As transformers' Qwen3MoeDecoderLayer decides it."""
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_hf(cls, hf_config: Any) -> Qwen3MoeConfig:
        d = dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()
        if d.get("model_type", "qwen3_moe") != "qwen3_moe":
            raise ValueError(f"model_type={d.get('model_type')!r} is not qwen3_moe")
        base = LlamaConfig.from_hf({**d, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]})
        experts = d["num_experts"] if "num_experts" in d else d["num_local_experts"]  # the checkpoints' name; transformers 5's
        return cls(**asdict(base), moe_intermediate_size=d["moe_intermediate_size"], num_experts=experts,
                   num_experts_per_tok=d["num_experts_per_tok"], norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                   decoder_sparse_step=d.get("decoder_sparse_step", 1) or 1,
                   mlp_only_layers=list(d.get("mlp_only_layers") or []))


class Experts(nn.Module):
    def __init__(self, config: Qwen3MoeConfig):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(e, h, i))  # [E, H, I]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids [T, k], w [T, k] (x's dtype) -> [T, H]."""
        if torch.compiler.is_compiling() or ids.numel() <= EAGER_GATHER_SLOTS:
            gate, up = torch.einsum("th,tkoh->tko", x, self.gate_up_proj[ids]).chunk(2, dim=-1)  # [T, k, I]
            y = torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, self.down_proj[ids])  # [T, k, H]
            return (y * w[..., None]).sum(dim=1)
        out = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            tok, j = torch.where(ids == e)
            gate, up = F.linear(x[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            out.index_add_(0, tok, F.linear(F.silu(gate) * up, self.down_proj[e]) * w[tok, j, None])
        return out


class Router(nn.Module):
    """The router's [E, H] weight (checkpoint `mlp.gate.weight`). Not an nn.Linear, as in
    transformers: online FP8 quantization leaves it in the model dtype (an FP8 router would
    choose other experts than the checkpoint's)."""

    def __init__(self, config: Qwen3MoeConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, E]
        return F.linear(x, self.weight)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: Qwen3MoeConfig):
        super().__init__()
        self.top_k, self.renormalize = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = Router(config)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, H]
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, H]
        logits = self.gate(x)  # [T, E]
        w, ids = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), self.top_k, dim=-1)  # [T, k]
        if self.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return self.experts(x, ids, w.to(x.dtype)).view(shape)


class DecoderLayer(nn.Module):
    attention = Attention  # OLMoE's norms its whole q / k projections (models/olmoe.py)
    moe_block = SparseMoeBlock  # Qwen2-MoE's adds its shared expert (models/qwen2_moe.py)

    def __init__(self, config: Qwen3MoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = self.attention(config, layer_idx)
        self.mlp = self.moe_block(config) if config.is_moe_layer(layer_idx) else MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class MoeModel(nn.Module):
    """Embedding, `layer(config, i)` for every layer, final norm; rope shared by the layers. The MoE
    files (this one, mixtral.py, qwen2_moe.py, olmoe.py) differ only in their decoder layer."""

    def __init__(self, config: LlamaConfig, layer: type[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, hidden]
        x = self.embed_tokens(input_ids)  # [B, S, hidden]
        cos, sin = self.rotary_emb(positions, x.dtype)  # [B, S, D]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class Qwen3MoeForCausalLM(nn.Module):
    """Module and parameter names mirror transformers 5's (model.layers.{i}.mlp.gate,
    .mlp.experts.gate_up_proj / down_proj, the rest as models/llama.py); a checkpoint's
    per-expert tensors are stacked into the experts' parameters by the loader. The other MoE
    files subclass it with their config, checkpoint names and decoder layer."""

    config_class = Qwen3MoeConfig
    expert_tensors = EXPERT_TENSORS
    decoder_layer = DecoderLayer

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = MoeModel(config, self.decoder_layer)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        device = device if device is not None else self.model.embed_tokens.weight.device
        self.model.rotary_emb.init_buffers(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: LongTensor [B, S] -> logits [B, S, V]."""
        return self.lm_head(self.model(input_ids, positions))
