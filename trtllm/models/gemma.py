"""The Gemma family as HF configs describe it: Gemma, Gemma-2, Gemma-3 (text).

One plain PyTorch module following the compilable-model contract (docs: DESIGN.md):

    forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]

Written like models/llama.py (same rope, same causal SDPA); what Gemma does differently:

- RMSNorm weights are offsets from 1, applied in fp32 and rounded once:
  ``(x.float() * rsqrt(mean(x.float()**2) + eps) * (1 + w.float())).type_as(x)``
- the embedding is scaled by sqrt(hidden), the scale rounded to the activation dtype first;
- the MLP is ``down(gelu_tanh(gate(x)) * up(x))``;
- the softmax scale is ``query_pre_attn_scalar ** -0.5`` (Gemma: head_dim ** -0.5);
- Gemma-2/3 ("sandwich" norms): a norm after attention and one after the MLP, before each
  residual add, and the MLP's input norm is called ``pre_feedforward_layernorm``;
- Gemma-2/3: sliding-window layers per ``layer_types`` (Gemma-2 alternates local/global,
  Gemma-3 five local to one global), final logit soft-capping ``cap * tanh(logits / cap)``;
- Gemma-2: attention logit soft-capping (``layer_softcaps``; models/attention.py's `causal_attention`);
- Gemma-3: QK-norm, and sliding layers have a rope of their own (base ``rope_local_base_freq``,
  unscaled) while full-attention layers use ``rope_theta`` with the config's rope scaling.

Family differences are read from the HF config by ``GemmaConfig.from_hf``, after transformers'
own config class has normalised the legacy fields (``rope_local_base_freq``,
``sliding_window_pattern``, ``rope_scaling``) exactly as the HF module would see them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trtllm.models.attention import causal_attention
from trtllm.models.llama import RotaryEmbedding, apply_rotary_pos_emb, refuse_quantization_config, rope_from_hf

# HF architecture names this file implements (config.json "architectures"[0]).
HF_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
_MODEL_TYPES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# HF activation name (ACT2FN) -> F.gelu's `approximate`
_GELUS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class GemmaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float  # softmax scale = query_pre_attn_scalar ** -0.5
    rms_norm_eps: float = 1e-6
    gelu_approximate: str = "tanh"  # F.gelu's: "tanh" (HF gelu_pytorch_tanh) or "none" (HF gelu)
    attention_bias: bool = False  # q/k/v/o biases
    sandwich_norms: bool = False  # Gemma-2/3: post-attention and pre/post-feedforward norms
    qk_norm: bool = False  # Gemma-3
    rope_theta: float = 10000.0  # full-attention layers (every layer before Gemma-3)
    rope_scaling: dict | None = None  # None, or {"rope_type": "linear" | "llama3", ...}
    local_rope_theta: float = 0.0  # Gemma-3 sliding layers' own rope base; 0 = one rope for all layers
    local_rope_scaling: dict | None = None
    layer_types: list[str] = field(default_factory=list)  # per layer: "full_attention" | "sliding_attention"
    layer_windows: list[int] = field(default_factory=list)  # per layer; 0 = full attention
    layer_softcaps: list[float] = field(default_factory=list)  # per layer attention logit cap; 0.0 = none
    final_logit_softcapping: float = 0.0  # 0.0 = none
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    model_type: str = "gemma"

    def __post_init__(self):
        n = self.num_hidden_layers
        self.layer_types = self.layer_types or ["full_attention"] * n
        self.layer_windows = self.layer_windows or [0] * n
        self.layer_softcaps = self.layer_softcaps or [0.0] * n
        for name in ("layer_types", "layer_windows", "layer_softcaps"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected num_hidden_layers={n}")
        if not set(self.layer_types) <= set(_LAYER_TYPES):
            raise ValueError(f"layer_types={self.layer_types} is not supported (expected {_LAYER_TYPES})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> GemmaConfig:
        """From a transformers PretrainedConfig or a config.json dict (transformers 4 or 5 layout)."""
        d = _normalised_hf_dict(hf_config)
        model_type = d["model_type"]
        n_layers, heads = d["num_hidden_layers"], d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        act = d.get("hidden_act") if model_type == "gemma" else d.get("hidden_activation")  # as HF's MLPs read it
        if act not in _GELUS:
            raise ValueError(f"activation {act!r} is not supported (supported: {sorted(_GELUS)})")
        refuse_quantization_config(d, "trtllm.models.gemma")
        if d.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True is not supported (trtllm runs causal decoders)")

        types = list(d.get("layer_types") or ["full_attention"] * n_layers)  # Gemma has none
        if model_type == "gemma3_text":  # rope_parameters per layer type: sliding layers have their own
            rope = d["rope_parameters"]
            theta, scaling = rope_from_hf({**d, "rope_parameters": rope["full_attention"]})
            local_theta, local_scaling = rope_from_hf({**d, "rope_parameters": rope["sliding_attention"]})
        else:
            theta, scaling = rope_from_hf(d)
            local_theta, local_scaling = 0.0, None
        window = d.get("sliding_window") or 0
        # HF's Gemma3Attention does not pass attn_logit_softcapping to attention: Gemma-2 only.
        attn_cap = (d.get("attn_logit_softcapping") or 0.0) if model_type == "gemma2" else 0.0
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            query_pre_attn_scalar=float(d["query_pre_attn_scalar"]) if model_type != "gemma" else float(head_dim),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            gelu_approximate=_GELUS[act],
            attention_bias=bool(d.get("attention_bias", False)),
            sandwich_norms=model_type != "gemma",
            qk_norm=model_type == "gemma3_text",
            rope_theta=theta,
            rope_scaling=scaling,
            local_rope_theta=local_theta,
            local_rope_scaling=local_scaling,
            layer_types=types,
            layer_windows=[int(window) if t == "sliding_attention" else 0 for t in types],
            layer_softcaps=[float(attn_cap)] * n_layers,
            final_logit_softcapping=float(d.get("final_logit_softcapping") or 0.0) if model_type != "gemma" else 0.0,
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            model_type=model_type,
        )


def _normalised_hf_dict(hf_config: Any) -> dict:
    """The config as transformers' config class of its model_type holds it (defaults filled in,
    legacy fields converted), as a dict. Refuses model types this file does not implement."""
    d = dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()
    model_type = d.get("model_type")
    if model_type is None:
        arch = (d.get("architectures") or [None])[0]
        model_type = next((t for t, a in _MODEL_TYPES.items() if a == arch), None)
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not in the Gemma family (supported: {sorted(_MODEL_TYPES)}; "
                         "multimodal Gemma-3 (gemma3) is not)")
    if isinstance(hf_config, dict):
        from transformers import AutoConfig  # imported here: transformers is slow to load

        d = AutoConfig.for_model(**{**d, "model_type": model_type}).to_dict()
    return d


class RMSNorm(nn.Module):
    """HF Gemma's RMSNorm: the weight is an offset from 1 (zeros = identity), applied in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__()
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.scale = config.query_pre_attn_scalar**-0.5
        self.window = config.layer_windows[layer_idx]  # 0 = full causal attention
        self.softcap = config.layer_softcaps[layer_idx]  # 0.0 = none
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape  # [B, S, hidden]
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim)  # [B, S, H, D]
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim)  # [B, S, KVH, D]
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim)  # [B, S, KVH, D]
        if self.q_norm is not None:  # Gemma-3 QK-norm, over head_dim, before rope
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|KVH, S, D]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        # Eagerly the window and soft-cap are applied here; under trtllm.compile this is plain
        # causal SDPA and the paged attention op applies both (from config.layer_windows / layer_softcaps).
        y = causal_attention(q, k, v, scale=self.scale, window=self.window, softcap=self.softcap)  # [B, H, S, D]
        y = y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)  # [B, S, H*D]
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        d, ff = config.hidden_size, config.intermediate_size
        self.approximate = config.gelu_approximate
        self.gate_proj = nn.Linear(d, ff, bias=False)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        return self.down_proj(F.gelu(self.gate_proj(x), approximate=self.approximate) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.sandwich = config.sandwich_norms
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(d, eps)
        # Gemma: the MLP's input norm (as in Llama). Gemma-2/3: the norm of the attention output.
        self.post_attention_layernorm = RMSNorm(d, eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(d, eps)
            self.post_feedforward_layernorm = RMSNorm(d, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        if not self.sandwich:  # Gemma
            h = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return h + self.mlp(self.post_attention_layernorm(h))
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaModel(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        # Gemma-3: the sliding layers' rope (its own base); None = every layer uses rotary_emb
        self.rotary_emb_local = (RotaryEmbedding(config.head_dim, config.local_rope_theta, config.local_rope_scaling)
                                 if config.local_rope_theta else None)
        self.local_rope = [t == "sliding_attention" and self.rotary_emb_local is not None for t in config.layer_types]
        # HF multiplies by sqrt(hidden) rounded to the activation dtype first (bf16: 55.5 for hidden 3072, not 55.43)
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size**0.5), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, hidden]
        x = self.embed_tokens(input_ids)  # [B, S, hidden]
        x = x * self.embed_scale.to(x.dtype)
        rope = self.rotary_emb(positions, x.dtype)  # (cos, sin) [B, S, D]
        rope_local = self.rotary_emb_local(positions, x.dtype) if self.rotary_emb_local is not None else rope
        for layer, local in zip(self.layers, self.local_rope):
            x = layer(x, *(rope_local if local else rope))
        return self.norm(x)


class GemmaForCausalLM(nn.Module):
    """Gemma / Gemma-2 / Gemma-3 (text) causal LM.

    Module and parameter names mirror HF's exactly (model.embed_tokens,
    model.layers.{i}.self_attn.{q,k,v,o}_proj, .q_norm/.k_norm, .mlp.{gate,up,down}_proj,
    .input_layernorm, .post_attention_layernorm, .pre/post_feedforward_layernorm, model.norm,
    lm_head), so the mapping from checkpoint tensor names to parameter names is the identity.
    """

    config_class = GemmaConfig

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """lm_head shares embed_tokens' Parameter when the config ties them (call again after replacing it)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute non-persistent buffers (rope inv_freq, embedding scale; fp32), e.g. after meta-device construction."""
        device = device if device is not None else self.model.embed_tokens.weight.device
        self.model.rotary_emb.init_buffers(device)
        if self.model.rotary_emb_local is not None:
            self.model.rotary_emb_local.init_buffers(device)
        self.model.embed_scale = torch.tensor(self.config.hidden_size**0.5, device=device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: LongTensor [B, S] -> logits [B, S, V]."""
        logits = self.lm_head(self.model(input_ids, positions))
        cap = self.config.final_logit_softcapping
        if cap:  # Gemma-2/3: cap * tanh(logits / cap)
            logits = torch.tanh(logits / cap) * cap
        return logits
