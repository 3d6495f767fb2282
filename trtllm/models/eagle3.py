"""EAGLE-3 draft heads (Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of Large
Language Models via Training-Time Test"), in the layout the published heads use
(yuhuili/EAGLE3-LLaMA3.1-Instruct-8B and SpecForge's output): one Llama decoder layer over
the target's own hidden states.

At position t the draft reads token t + 1 and a hidden state g_t, and predicts token t + 2:

    g_t     = fc(cat(h_a[t], h_b[t], h_c[t]))          # [H]: the states leaving target layers a, b, c
                                                        # (the target's graph computes it: passes/stash_hidden_states.py)
    x       = cat(input_layernorm(embed(tok_{t+1})), hidden_norm(g_t))   # [2H]
    r       = g_t + o_proj(attention(q, k, v of x; rope at t))           # causal, the draft's own K/V
    prenorm = r + mlp(post_attention_layernorm(r))      # [H]
    logits  = lm_head(norm(prenorm))                    # [Vd]: the draft vocabulary, token = d + d2t[d]

A proposal's later steps feed the draft its own `prenorm` of the position before as g (not
through fc). The forward keeps the compilable-model contract, `forward(input_ids, positions)
-> logits`: g comes from `trtllm.draft_hidden_input`, which reads the stores the runtime fills
(trtllm/hidden_states.py), and the pass stashes `prenorm` (the state leaving `layers.0`).

Checkpoint names: `midlayer.*` (or `layers.0.*`) -> `layers.0.*`; `fc`, `norm`, `lm_head`,
`d2t` [Vd] (draft id -> target id offset), `t2d` [V] (unused: d2t says it), `embed_tokens`
(absent in the published heads: the target's embedding, shared). config.json as the heads'
(`draft_vocab_size`, `target_hidden_size`; the target layers to read from
`eagle_aux_hidden_state_layer_ids`, default TensorRT-LLM's (1, L/2 - 1, L - 4)).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trtllm.hidden_states import draft_hidden_input  # noqa: F401  registers torch.ops.trtllm.draft_hidden_input
from trtllm.models.attention import causal_attention
from trtllm.models.llama import MLP, RMSNorm, RotaryEmbedding, apply_rotary_pos_emb, rope_from_hf

_REQUIRED = ("fc.weight", "norm.weight", "lm_head.weight") + tuple(
    f"layers.0.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm",
                                     "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
_OPTIONAL = ("embed_tokens.weight", "d2t", "t2d")


@dataclass
class Eagle3Config:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int          # the target's
    draft_vocab_size: int
    target_hidden_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    aux_layers: tuple[int, ...] | None = None  # target layers whose output fc reads; None: the default
    mlp_bias: bool = False   # (llama.MLP reads it)

    @classmethod
    def from_hf(cls, d: dict) -> Eagle3Config:
        arch = (d.get("architectures") or [""])[0]
        if "eagle3" not in arch.lower().replace("_", "").replace("-", ""):
            raise ValueError(f"architecture {arch!r} is not an EAGLE-3 head (expected e.g. LlamaForCausalLMEagle3; "
                             "EAGLE-1/2 heads are not supported)")
        if d.get("num_hidden_layers", 1) != 1:
            raise ValueError(f"an EAGLE-3 head has one decoder layer, this config says {d['num_hidden_layers']}")
        heads = d["num_attention_heads"]
        theta, scaling = rope_from_hf(d)
        layers = d.get("eagle_aux_hidden_state_layer_ids") or (d.get("eagle_config") or {}).get(
            "eagle_aux_hidden_state_layer_ids")
        return cls(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"], num_attention_heads=heads,
                   num_key_value_heads=d.get("num_key_value_heads") or heads,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads, vocab_size=d["vocab_size"],
                   draft_vocab_size=d.get("draft_vocab_size") or d["vocab_size"],
                   target_hidden_size=d.get("target_hidden_size") or d["hidden_size"],
                   rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                   max_position_embeddings=d.get("max_position_embeddings", 2048),
                   aux_layers=tuple(layers) if layers else None)

    def target_layers(self, num_target_layers: int) -> tuple[int, ...]:
        """The target layers whose output the head reads (checked against the target's count)."""
        n = num_target_layers
        layers = self.aux_layers or (1, n // 2 - 1, n - 4)
        if len(layers) != 3 or len(set(layers)) != 3 or not all(0 <= i < n for i in layers):
            raise ValueError(f"EAGLE-3 reads three distinct target layers of {n}; got {list(layers)}"
                             + ("" if self.aux_layers else " by default: set eagle_aux_hidden_state_layer_ids in "
                                                           "the head's config.json"))
        return tuple(layers)


class Eagle3Attention(nn.Module):
    def __init__(self, config: Eagle3Config):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(2 * d, self.n_heads * hd, bias=False)  # in: cat(embedding, hidden)
        self.k_proj = nn.Linear(2 * d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape  # [B, S, 2H]
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, S, D]
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        y = causal_attention(q, k, v, scale=self.head_dim**-0.5)  # [B, H, S, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))  # [B, S, H]


class Eagle3Layer(nn.Module):
    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos, sin) -> torch.Tensor:  # [B, S, H] each
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)  # [B, S, 2H]
        r = hidden + self.self_attn(x, cos, sin)
        return r + self.mlp(self.post_attention_layernorm(r))  # prenorm [B, S, H]


class Eagle3Draft(nn.Module):
    """The head as a causal LM over the draft vocabulary: logits [B, S, Vd]; `draft_to_target`
    [Vd] maps its ids to the target's."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.fc = nn.Linear(3 * config.target_hidden_size, h, bias=False)  # runs in the target's graph
        self.layers = nn.ModuleList([Eagle3Layer(config)])
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("draft_to_target", torch.arange(config.draft_vocab_size), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)  # [B, S, H]
        hidden = torch.ops.trtllm.draft_hidden_input(input_ids, embeds.shape[-1], embeds.dtype)  # [B, S, H]
        cos, sin = self.rotary_emb(positions, embeds.dtype)
        x = self.layers[0](embeds, hidden, cos, sin)  # [B, S, H], stashed for the next draft step
        return self.lm_head(self.norm(x))  # [B, S, Vd]


def load_eagle3(path: str | Path, target: nn.Module, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None, target_embedding: torch.Tensor | None = None) -> Eagle3Draft:
    """The head in `path` (config.json + *.safetensors or pytorch_model.bin), its embedding the
    target's unless it has its own; every tensor's name and shape checked. `target_embedding`:
    the target's whole embedding weight where `target` holds a stand-in (a tensor-parallel rank,
    which reads only its vocabulary rows)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"EAGLE-3 head: no config.json in {path}")
    config = Eagle3Config.from_hf(json.loads(config_file.read_text()))
    weights = _read_weights(path)
    if target_embedding is None:
        target_embedding = input_embedding(target).weight
    device = torch.device(device) if device is not None else target_embedding.device
    dtype = dtype or target_embedding.dtype
    if target_embedding.shape != (config.vocab_size, config.hidden_size) and "embed_tokens.weight" not in weights:
        raise ValueError(f"EAGLE-3 head {path}: no embed_tokens of its own and the target's embedding is "
                         f"{tuple(target_embedding.shape)}, not ({config.vocab_size}, {config.hidden_size})")
    with torch.device("meta"):
        draft = Eagle3Draft(config)
    expected = {name: p.shape for name, p in draft.named_parameters()}
    for name in _REQUIRED:
        if name not in weights:
            raise ValueError(f"EAGLE-3 head {path}: tensor {name} (or midlayer.* for layers.0.*) is missing")
    for name, t in weights.items():
        if name in expected and t.shape != expected[name]:
            raise ValueError(f"EAGLE-3 head {path}: {name} is {tuple(t.shape)}, the config says {tuple(expected[name])}")
    # assigned, not copied into the meta module's fp32 tensors: the head takes `dtype`
    state = {k: v.to(device, dtype) for k, v in weights.items() if k in expected}
    if "embed_tokens.weight" not in state:
        draft.embed_tokens.weight = target_embedding if isinstance(target_embedding, nn.Parameter) else \
            nn.Parameter(target_embedding, requires_grad=False)  # shared, not copied
        expected.pop("embed_tokens.weight")
    draft.load_state_dict(state, strict=False, assign=True)
    draft.rotary_emb.init_buffers(device)
    draft.draft_to_target = _draft_to_target(weights.get("d2t"), config, path).to(device)
    return draft.requires_grad_(False).eval()


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    weights: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file
        for f in files:
            weights.update(load_file(f))
    elif (path / "pytorch_model.bin").is_file():
        weights = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"EAGLE-3 head: no *.safetensors or pytorch_model.bin in {path}")
    out = {}
    for name, t in weights.items():
        key = name.removeprefix("model.")
        key = "layers.0." + key.removeprefix("midlayer.") if key.startswith("midlayer.") else key
        if key not in _REQUIRED and key not in _OPTIONAL:
            raise ValueError(f"EAGLE-3 head {path}: unexpected tensor {name} (not in the EAGLE-3 layout)")
        out[key] = t
    return out


def _draft_to_target(d2t: torch.Tensor | None, config: Eagle3Config, path: Path) -> torch.Tensor:
    """[Vd] target ids of the draft ids: d + d2t[d] (the published offsets), identity without d2t."""
    ids = torch.arange(config.draft_vocab_size)
    if d2t is None:
        if config.draft_vocab_size != config.vocab_size:
            raise ValueError(f"EAGLE-3 head {path}: a draft vocabulary of {config.draft_vocab_size} tokens "
                             f"(the target's: {config.vocab_size}) needs d2t")
        return ids
    if tuple(d2t.shape) != (config.draft_vocab_size,):
        raise ValueError(f"EAGLE-3 head {path}: d2t is {tuple(d2t.shape)}, expected ({config.draft_vocab_size},)")
    target = ids + d2t.long()
    if target.min() < 0 or target.max() >= config.vocab_size:
        raise ValueError(f"EAGLE-3 head {path}: d2t maps draft ids outside the target's {config.vocab_size} tokens")
    return target


def input_embedding(target: nn.Module) -> nn.Embedding:
    """The target's token embedding: get_input_embeddings() (HF) or its first nn.Embedding."""
    get = getattr(target, "get_input_embeddings", None)
    emb = get() if callable(get) else next((m for m in target.modules() if isinstance(m, nn.Embedding)), None)
    if not isinstance(emb, nn.Embedding):
        raise ValueError("EAGLE-3: cannot find the target model's token embedding (nn.Embedding)")
    return emb
