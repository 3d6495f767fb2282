"""The Llama family as HF configs describe it: Llama 2/3/3.1, Mistral, Qwen2, Qwen3.

One plain PyTorch module following the compilable-model contract (docs: DESIGN.md):

    forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]

written as for a batch of whole sequences, attention through models/attention.py's
``causal_attention`` (ordinary ``F.scaled_dot_product_attention(..., is_causal=True)``, a banded
mask eagerly where a sliding window bites). The model knows nothing of
caches; ``trtllm.compile`` turns it into a paged, batched one. The shapes below are
the ones the compiler's passes pattern-match, so keep their form:

- RMSNorm:  ``weight * (x.float() * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(dtype)``
- rope:     ``q * cos + rotate_half(q) * sin`` with cos/sin ``[B, 1, S, D]`` (unsqueezed over heads)
- MLP:      ``down(silu(gate(x)) * up(x))``

Family differences, all read from the HF config by ``LlamaConfig.from_hf``:
Qwen2 has q/k/v biases; Qwen3 has QK-norm (RMSNorm over head_dim on q and k before
rope) and a ``head_dim`` that need not be hidden/heads; Llama 3.1 has "llama3" rope
scaling; Mistral and Qwen2/3 may have sliding-window layers (``layer_windows``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trtllm.kernels.rotary import rope_inv_freq
from trtllm.models.attention import causal_attention

# HF architecture names this file implements (config.json "architectures"[0]).
HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or {"rope_type": "linear" | "llama3", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama/Qwen3 with attention_bias
    o_bias: bool = False  # Llama/Qwen3 with attention_bias
    mlp_bias: bool = False  # Llama mlp_bias
    qk_norm: bool = False  # Qwen3
    layer_windows: list[int] = field(default_factory=list)  # per layer; 0 = full attention
    model_type: str = "llama"
    # M-RoPE (Qwen2-VL / Qwen2.5-VL): the rotary frequencies split in sections rotated by the
    # temporal, height and width positions; None: ordinary 1-D rope
    mrope_section: list[int] | None = None

    @property
    def position_axes(self) -> int:
        """Rows of `positions` the model takes: 3 under M-RoPE ([3, B, S]), else 1 ([B, S])."""
        return 3 if self.mrope_section else 1

    def __post_init__(self):
        if not self.layer_windows:
            self.layer_windows = [0] * self.num_hidden_layers
        if len(self.layer_windows) != self.num_hidden_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries, "
                             f"expected num_hidden_layers={self.num_hidden_layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> LlamaConfig:
        """From a transformers PretrainedConfig or a config.json dict (transformers 4 or 5 layout)."""
        d = dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()
        model_type = d.get("model_type") or _model_type_from_architectures(d.get("architectures"))
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is not in the Llama family "
                             f"(supported: {sorted(_MODEL_TYPES)})")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={act!r} is not supported (only 'silu')")
        refuse_quantization_config(d, "trtllm.models.llama")
        heads = d["num_attention_heads"]
        n_layers = d["num_hidden_layers"]
        theta, scaling = rope_from_hf(d)
        bias = bool(d.get("attention_bias", False))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3") and bias),
            o_bias=model_type in ("llama", "qwen3") and bias,
            mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            layer_windows=layer_windows_from_hf(d, model_type, n_layers),
            model_type=model_type,
        )


def _model_type_from_architectures(architectures) -> str:
    arch = (architectures or ["LlamaForCausalLM"])[0]
    for model_type, name in _MODEL_TYPES.items():
        if name == arch:
            return model_type
    raise ValueError(f"architecture {arch!r} is not in the Llama family (supported: {HF_ARCHITECTURES})")


def refuse_quantization_config(d: dict, module: str) -> None:
    """Our model files build unquantized layers: a config with quantization_config is refused."""
    if d.get("quantization_config"):
        raise ValueError(f"quantization_config is set: {module} builds unquantized layers; load a "
                         "pre-quantized checkpoint with trtllm.load_model or LLM(model=path), which read its "
                         "layout (trtllm/quantization, docs/quantization.md)")


def rope_from_hf(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5 `rope_parameters` or 4's `rope_theta`/`rope_scaling`."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})  # an object: checkpoint_config.py
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type rope_parameters {sorted(params)} are not supported")
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} is not supported (supported: {_ROPE_TYPES})")
    partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if params.get(key) is None:
                raise ValueError(f"rope_type='llama3' needs rope parameter {key!r}")
    if rope_type == "linear" and params.get("factor") is None:
        raise ValueError("rope_type='linear' needs rope parameter 'factor'")
    return theta, {"rope_type": rope_type, **params}


def layer_windows_from_hf(d: dict, model_type: str, n_layers: int) -> list[int]:
    """Sliding window per layer (0 = full), as HF's Mistral / Qwen2 / Qwen3 decide it, from a
    config dict (config.json, or an HF config's `to_dict()`)."""
    window = d.get("sliding_window")
    if model_type == "llama" or not window:
        return [0] * n_layers
    if model_type == "mistral":  # Mistral: every layer, whenever sliding_window is set
        return [int(window)] * n_layers
    if not d.get("use_sliding_window", False):  # Qwen2/3 ignore sliding_window unless this is on
        return [0] * n_layers
    max_window_layers = d.get("max_window_layers", 28)
    types = d.get("layer_types") or [
        "sliding_attention" if i >= max_window_layers else "full_attention" for i in range(n_layers)]
    if len(types) != n_layers or not set(types) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"layer_types={types} is not supported "
                         f"(expected {n_layers} of 'full_attention' / 'sliding_attention')")
    return [int(window) if t == "sliding_attention" else 0 for t in types]


def rope_inv_freq_hf(head_dim: int, theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """Rope inverse frequencies [head_dim // 2], fp32, exactly as transformers computes them.

    default and "llama3" (`modeling_rope_utils._compute_llama3_parameters`) come from
    `trtllm.kernels.rotary.rope_inv_freq`; "linear" divides the default ones by `factor`.
    """
    if rope_scaling is not None and rope_scaling["rope_type"] == "linear":
        return rope_inv_freq(head_dim, theta, None) / rope_scaling["factor"]
    return rope_inv_freq(head_dim, theta, rope_scaling)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        dtype = x.dtype
        return self.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin [B, S, D] from positions [B, S]; `inv_freq` is a non-persistent fp32 buffer.
    D is the rotated part of a head: head_dim, or less under partial rotary (Phi-3).

    M-RoPE (`mrope_section`, Qwen2-VL / Qwen2.5-VL): positions [3, B, S] (temporal, height,
    width; [B, S] means the same position on all three), and frequency i of section j is
    turned by axis j % 3's position, as HF's `recomposition_frequencies`. The result is the
    same [B, S, D] cos/sin, so the rotary fusion and the attention kernels are untouched."""

    def __init__(self, dim: int, theta: float, rope_scaling: dict | None, mrope_section: list[int] | None = None):
        super().__init__()
        self.head_dim, self.theta, self.rope_scaling = dim, theta, rope_scaling
        self.mrope_section = list(mrope_section) if mrope_section else None
        if self.mrope_section is not None and sum(self.mrope_section) != dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} sums to {sum(self.mrope_section)}, not "
                             f"head_dim / 2 = {dim // 2}")
        self.register_buffer("inv_freq", rope_inv_freq_hf(dim, theta, rope_scaling), persistent=False)

    def init_buffers(self, device: torch.device | str) -> None:
        self.inv_freq = rope_inv_freq_hf(self.head_dim, self.theta, self.rope_scaling).to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.float()  # [B, S, D/2] ([3, B, S, D/2] M-RoPE)
        if self.mrope_section is not None:
            if positions.dim() == 3:  # each section from its axis' positions
                sections = freqs.split(self.mrope_section, dim=-1)
                freqs = torch.cat([sec[i % 3] for i, sec in enumerate(sections)], dim=-1)  # [B, S, D/2]
            elif positions.dim() != 2:
                raise ValueError(f"M-RoPE positions are [3, B, S] (or [B, S]), got {tuple(positions.shape)}")
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):  # q [B, H, S, D], k [B, KVH, S, D], cos/sin [B, S, D]
    cos = cos.unsqueeze(1)  # [B, 1, S, D]
    sin = sin.unsqueeze(1)
    q_embed = q * cos + rotate_half(q) * sin
    k_embed = k * cos + rotate_half(k) * sin
    return q_embed, k_embed


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.scale = hd**-0.5
        self.window = config.layer_windows[layer_idx]  # 0 = full causal attention
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=config.o_bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape  # [B, S, hidden]
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim)  # [B, S, H, D]
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim)  # [B, S, KVH, D]
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim)  # [B, S, KVH, D]
        if self.q_norm is not None:  # Qwen3 QK-norm, over head_dim, before rope
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|KVH, S, D]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        # A sliding window that bites: a banded causal mask eagerly. Under trtllm.compile the
        # paged attention op applies the window itself (the pass reads config.layer_windows).
        y = causal_attention(q, k, v, scale=self.scale, window=self.window)  # [B, H, S, D]
        y = y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)  # [B, S, H*D]
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, ff, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, ff, bias=bias)
        self.up_proj = nn.Linear(d, ff, bias=bias)
        self.down_proj = nn.Linear(ff, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                          config.mrope_section)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, hidden]
        x = self.embed_tokens(input_ids)  # [B, S, hidden]
        cos, sin = self.rotary_emb(positions, x.dtype)  # [B, S, D] (positions [3, B, S] under M-RoPE)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Llama / Mistral / Qwen2 / Qwen3 causal LM.

    Module and parameter names mirror HF's exactly (model.embed_tokens,
    model.layers.{i}.self_attn.{q,k,v,o}_proj, .q_norm/.k_norm, .mlp.{gate,up,down}_proj,
    .input_layernorm, .post_attention_layernorm, model.norm, lm_head), so the mapping from
    checkpoint tensor names to parameter names is the identity.
    """

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
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
